"""Wire messages and typed config: msgspec Structs and nothing else."""

from schemas.messages import *  # noqa: F401,F403
from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION, TAGS, Message  # noqa: F401
