"""Writes ``tests/data/rollouts.stream``: a recorded Rollout stream for the reward-stage replay test.

Run ``python tests/data/make_rollouts.py`` from the repository root. The messages are
deterministic (fixed completions, zero logprobs); only the recording and envelope times vary.
The stream uses the record format of ``transport.record`` (docs/stream-format.md), as if
the reward stage's receiving socket ``rollouts`` had been tapped.

``EXPECTED`` is the reward of every sample, worked out by hand from each task's rule, and
written next to the stream as ``rollouts.expected.json`` (group_id → rewards).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from schemas.messages import PromptGroup, Rollout, Sample  # noqa: E402
from stages.model import BOS_ID, EOS_ID, load_tokenizer  # noqa: E402
from transport.codec import Codec  # noqa: E402
from transport.record import StreamRecorder  # noqa: E402

HERE = Path(__file__).resolve().parent
STREAM_PATH = HERE / "rollouts.stream"
EXPECTED_PATH = HERE / "rollouts.expected.json"

# group_id, task, prompt, answer, [(completion, ends_with_eos, expected_reward)]
GROUPS = [
    ("replay-0", "repeat", "7:", "7777", [("7777", True, 1.0), ("77", True, 0.5), ("7717", True, 0.75),
                                          ("77777777", False, 0.5)]),
    ("replay-1", "copy", "47>", "47", [("47", True, 1.0), ("74", True, 0.0), ("4", True, 0.5), ("", True, 0.0)]),
    ("replay-2", "reverse", "472<", "274", [("274", True, 1.0), ("472", True, 1 / 3), ("27", False, 2 / 3)]),
    ("replay-3", "arith", "12+7=", "19", [("19", True, 1.0), ("20", True, 0.0), ("19.0", True, 1.0),
                                         ("x", True, 0.0)]),
]
EXPECTED = {group_id: [reward for _, _, reward in samples] for group_id, _, _, _, samples in GROUPS}


def build_rollouts() -> list[Rollout]:
    tokenizer = load_tokenizer()
    rollouts = []
    for group_id, task, prompt, answer, samples in GROUPS:
        prompt_ids = np.asarray([BOS_ID, *tokenizer.encode(prompt).ids], dtype=np.int32)
        group = PromptGroup(group_id, prompt_ids, answer, task, len(samples), 0, 0, prompt)
        built = []
        for completion, ends_with_eos, _ in samples:
            ids = tokenizer.encode(completion).ids + ([EOS_ID] if ends_with_eos else [])
            built.append(Sample(np.asarray(ids, dtype=np.int32), np.zeros(len(ids), dtype=np.float32),
                                np.asarray([[0, 0]], dtype=np.int32), "stop" if ends_with_eos else "length"))
        rollouts.append(Rollout(group, built, "rollout/0", 0.01))
    return rollouts


def main() -> None:
    STREAM_PATH.unlink(missing_ok=True)
    recorder = StreamRecorder(STREAM_PATH)
    codec = Codec("rollout/0")
    for rollout in build_rollouts():
        recorder("rollouts", codec.encode(rollout))
    recorder.close()
    EXPECTED_PATH.write_text(json.dumps(EXPECTED, indent=1) + "\n")
    print(f"wrote {STREAM_PATH} ({recorder.records} rollouts) and {EXPECTED_PATH}")


if __name__ == "__main__":
    main()
