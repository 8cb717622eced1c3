"""PromptSource: credit/staleness bound, leases, restart reissue, issued.jsonl, state, datasets."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.messages import DroppedGroup, Progress
from stages.model import BOS_ID, load_tokenizer
from stages.source import DatasetError, PromptSource, SourceConfig, load_dataset
from stages.testing import FakeClock


def make_source(tmp_path, clock=None, **overrides) -> PromptSource:
    config = SourceConfig(**{"groups_per_step": 2, "max_staleness": 1, "lease_seconds": 10.0, **overrides})
    return PromptSource(config, tmp_path / "run", clock=clock or FakeClock())


def read_issued(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "issued.jsonl").read_text().splitlines()]


def test_groups_are_tokenized_with_bos_and_have_stable_ids(tmp_path):
    source = make_source(tmp_path, seed=7, n_samples=3)
    groups = source.poll()
    assert [g.group_id for g in groups] == ["7-0", "7-1", "7-2", "7-3"]
    first = groups[0]
    assert first.prompt_ids[0] == BOS_ID and first.prompt_ids.dtype.name == "int32"
    assert load_tokenizer().decode(first.prompt_ids[1:].tolist()) == first.prompt_text
    assert first.answer == first.prompt_text[-2] * 4 and first.task == "repeat"
    assert (first.n_samples, first.attempt, first.issued_version) == (3, 0, 0)


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_never_issues_past_the_staleness_bound(tmp_path, max_staleness):
    groups_per_step = 3
    source = make_source(tmp_path, groups_per_step=groups_per_step, max_staleness=max_staleness,
                         lease_seconds=1e9)
    window = groups_per_step * (max_staleness + 1)
    queue = []  # a FIFO learner's input
    version = 0
    for step in range(20):
        queue += source.poll()
        assert len(source.outstanding) <= window
        assert source.poll() == []  # no credit left until progress arrives
        batch, queue = queue[:groups_per_step], queue[groups_per_step:]
        for group in batch:  # trained with weights `version`
            assert 0 <= version - group.issued_version <= max_staleness
        version += 1
        source.on_progress(Progress(step + 1, version, [g.group_id for g in batch]))
    assert source.counters["consumed"] == 20 * groups_per_step


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_weight_lag_shrinks_the_window_so_nothing_is_generated_too_stale(tmp_path, max_staleness):
    clock = FakeClock()
    source = make_source(tmp_path, clock=clock, groups_per_step=2, max_staleness=max_staleness,
                         lease_seconds=1e9, follow_weights=True, weights_wait_s=30.0)
    first = source.poll()
    assert len(first) == 2 * (max_staleness + 1)
    source.on_progress(Progress(1, 1, [g.group_id for g in first[:2]]))  # v1 trained, not live yet
    assert len(source.poll()) == 2 * (max_staleness + 1) - 2 - len(first[2:])  # window shrank by one step
    if max_staleness == 0:
        assert source.poll() == []  # synchronous: wait for v1 to be live
        clock.advance(29.0)
        assert source.poll() == []
        source.on_weights_ready(1)
        assert len(source.poll()) == 2
    else:
        source.on_weights_ready(1)
        assert len(source.poll()) == 2


def test_a_version_that_never_goes_live_stalls_issuing_only_for_weights_wait_s(tmp_path):
    clock = FakeClock()
    source = make_source(tmp_path, clock=clock, groups_per_step=2, max_staleness=0, lease_seconds=1e9,
                         follow_weights=True, weights_wait_s=30.0)
    groups = source.poll()
    source.on_progress(Progress(1, 1, [g.group_id for g in groups]))
    assert source.poll() == []
    clock.advance(30.0)
    assert len(source.poll()) == 2  # issue anyway rather than deadlock


def test_after_a_learner_rollback_generation_waits_for_the_restarted_learners_weights(tmp_path):
    """Learner epoch 1 reached v3 (live); epoch 2 resumed step 1. Engines still serve epoch
    1's v3, a timeline that no longer exists: no fresh groups until epoch 2's weights are live."""
    clock = FakeClock()
    source = make_source(tmp_path, clock=clock, groups_per_step=2, max_staleness=2, lease_seconds=1e9,
                         follow_weights=True, weights_wait_s=30.0)
    for step in (1, 2, 3):
        groups = source.poll()
        source.on_progress(Progress(step, step, [g.group_id for g in groups[:2]], [], checkpoint_step=1,
                                    learner_epoch=1))
        source.on_weights_ready(step, 1)
    assert (source.live_version, source.learner_version, source.credit()) == (3, 3, 2)
    source.on_progress(Progress(1, 1, [], [], checkpoint_step=1, learner_epoch=2))
    again = source.poll()
    assert len(again) == 4 and all(g.attempt == 1 for g in again)  # steps 2 and 3 rolled back
    source.on_progress(Progress(2, 2, [g.group_id for g in again], [], checkpoint_step=1, learner_epoch=2))
    assert len(source.outstanding) == 4 and source.credit() == 0  # engines: epoch 1's v3 (lag 0 by number)
    source.on_weights_ready(4, 1)  # a late broadcast of the dead learner changes nothing
    assert (source.live_version, source.live_epoch, source.credit()) == (4, 1, 0)
    source.on_weights_ready(1, 2)  # lower version, newer epoch: live; lag 1 shrinks the window to 4
    assert (source.live_version, source.live_epoch, source.learner_version) == (1, 2, 2)
    assert source.credit() == 0
    source.on_weights_ready(3, 1)
    assert (source.live_version, source.live_epoch) == (1, 2)
    source.on_weights_ready(2, 2)
    assert source.credit() == 2

    source.on_progress(Progress(2, 2, [], [], checkpoint_step=2, learner_epoch=3))  # a restart at step 2
    assert source.credit() == 0  # its weights never go live: issuing stalls for weights_wait_s only
    clock.advance(30.0)
    assert source.credit() == 2


def test_weights_of_a_restarted_learner_may_precede_its_progress(tmp_path):
    source = make_source(tmp_path, follow_weights=True, max_staleness=0)
    source.on_progress(Progress(5, 5, [], [], learner_epoch=1))
    source.on_weights_ready(5, 1)
    source.on_weights_ready(2, 2)  # epoch 2 resumed step 2; its first Progress is still in flight
    assert (source.learner_version, source.live_version, source.learner_epoch) == (2, 2, 2)
    assert source.credit() == source.window
    source.on_progress(Progress(2, 2, [], [], checkpoint_step=2, learner_epoch=2))
    assert source.credit() == source.window


def test_dropped_groups_return_their_credit(tmp_path):
    source = make_source(tmp_path)
    groups = source.poll()
    assert source.credit() == 0
    source.on_progress(Progress(1, 1, [groups[0].group_id], [DroppedGroup(groups[1].group_id, "stale")]))
    assert source.credit() == 2 and source.learner_version == 1
    fresh = source.poll()
    assert [g.issued_version for g in fresh] == [1, 1]
    source.on_progress(Progress(2, 2, ["unknown-id", groups[0].group_id]))  # duplicates ignored
    assert source.counters["consumed"] == 1 and source.counters["dropped"] == 1


def test_a_duplicate_copy_dropped_leaves_the_group_outstanding(tmp_path):
    source = make_source(tmp_path)
    groups = source.poll()
    source.on_progress(Progress(0, 0, [], [DroppedGroup(groups[0].group_id, "duplicate")]))
    assert groups[0].group_id in source.outstanding and source.credit() == 0
    source.on_progress(Progress(1, 1, [groups[0].group_id]))  # the other copy trained
    assert groups[0].group_id not in source.outstanding and source.counters["dropped"] == 0


def test_reissues_a_group_whose_lease_expired_with_same_id_and_next_attempt(tmp_path):
    clock = FakeClock()
    source = make_source(tmp_path, clock=clock)
    first = source.poll()
    clock.advance(5)
    source.on_progress(Progress(1, 1, [first[0].group_id]))
    second = source.poll()  # one fresh group for the freed credit, no reissue yet
    assert len(second) == 1 and second[0].attempt == 0
    assert source.next_lease_expiry() == clock.now - 5 + 10
    clock.advance(5)
    reissued = source.poll()
    assert sorted(g.group_id for g in reissued) == sorted(g.group_id for g in first[1:])
    assert all(g.attempt == 1 and g.issued_version == 1 for g in reissued)
    assert reissued[0].prompt_text == first[1].prompt_text
    assert len(source.outstanding) == 4  # reissues take no credit
    lines = read_issued(tmp_path)
    assert [line["reason"] for line in lines].count("lease") == 3
    assert {line["group_id"] for line in lines if line["reason"] == "lease"} == {g.group_id for g in first[1:]}


def test_abandons_a_group_after_max_attempts_and_reports_it_failed(tmp_path):
    clock = FakeClock()
    source = make_source(tmp_path, clock=clock, groups_per_step=1, max_staleness=0, max_attempts=2)
    (group,) = source.poll()
    clock.advance(10)
    (again,) = source.poll()
    assert again.attempt == 1
    clock.advance(10)
    fresh = source.poll()  # attempt 2 would exceed max_attempts: abandoned, credit freed
    assert [g.group_id for g in fresh] == ["0-1"]
    (failed,) = source.take_failed()
    assert failed.group_id == group.group_id and failed.stage == "source" and "2 issues" in failed.reason
    assert source.take_failed() == [] and source.counters["abandoned"] == 1


def test_reissue_all_outstanding_after_a_downstream_restart(tmp_path):
    source = make_source(tmp_path)
    groups = source.poll()
    again = source.reissue_all_outstanding()
    assert [g.group_id for g in again] == [g.group_id for g in groups]
    assert all(g.attempt == 1 for g in again)
    assert [line["reason"] for line in read_issued(tmp_path)] == ["fresh"] * 4 + ["restart"] * 4


def test_groups_trained_after_the_last_checkpoint_are_reissued_when_the_learner_rolls_back(tmp_path):
    source = make_source(tmp_path, lease_seconds=1e9, max_attempts=1)
    trained = {}
    for step in (1, 2, 3):
        groups = source.poll()
        batch = [g.group_id for g in groups[:2]]
        trained[step] = batch
        # checkpoint at step 1 (reported with step 1's progress, as the learner shell does)
        source.on_progress(Progress(step, step, batch, [], checkpoint_step=1))
    assert set(source.undurable) == set(trained[2] + trained[3])  # step 1 is covered
    assert source.credit() == 2  # consumed groups return their credit at once
    source.on_progress(Progress(1, 1, [], [], checkpoint_step=1))  # restarted from step 1
    again = {g.group_id: g for g in source.poll()}
    rolled = [line["group_id"] for line in read_issued(tmp_path) if line["reason"] == "rollback"]
    assert sorted(rolled) == sorted(trained[2] + trained[3])
    rolled = [again[g] for g in rolled]
    assert all(g.attempt == 1 for g in rolled)  # max_attempts=1 yet not abandoned
    assert source.take_failed() == [] and not source.undurable
    state = source.state_dict()
    source.on_progress(Progress(2, 2, trained[2], [], checkpoint_step=2))
    assert set(source.undurable) == set() and source.learner_step == 2
    restored = make_source(tmp_path / "r", lease_seconds=1e9, max_attempts=1)
    restored.load_state_dict(state)
    assert restored.learner_step == 1 and set(restored.outstanding) >= set(trained[2] + trained[3])


def test_undurable_groups_survive_a_source_restart(tmp_path):
    source = make_source(tmp_path, lease_seconds=1e9)
    groups = source.poll()
    source.on_progress(Progress(1, 1, [groups[0].group_id], []))  # no checkpoint yet
    restored = make_source(tmp_path / "r", lease_seconds=1e9)
    restored.load_state_dict(json.loads(json.dumps(source.state_dict())))
    restored.on_progress(Progress(0, 0, [], []))  # learner restarted with no checkpoint
    assert groups[0].group_id in {g.group_id for g in restored.poll()}


def test_issued_jsonl_records_every_issue(tmp_path):
    clock = FakeClock(500.0)
    source = make_source(tmp_path, clock=clock)
    groups = source.poll()
    lines = read_issued(tmp_path)
    assert [(l["group_id"], l["attempt"], l["time"], l["issued_version"], l["cursor"]) for l in lines] == [
        (g.group_id, 0, 500.0, 0, i) for i, g in enumerate(groups)]


def test_state_round_trip_resumes_the_same_stream(tmp_path):
    clock = FakeClock()
    reference = make_source(tmp_path / "a", clock=clock)
    reference_ids = []
    source = make_source(tmp_path / "b", clock=clock)
    for step in range(3):
        groups, ref_groups = source.poll(), reference.poll()
        reference_ids += [(g.group_id, g.prompt_text) for g in ref_groups]
        done = [g.group_id for g in groups[:2]]
        source.on_progress(Progress(step + 1, step + 1, done))
        reference.on_progress(Progress(step + 1, step + 1, done))
    source.save_state(tmp_path / "state.json")
    restored = make_source(tmp_path / "b", clock=clock)
    restored.load_state(tmp_path / "state.json")
    assert restored.cursor == source.cursor and restored.learner_version == 3
    assert restored.outstanding == source.outstanding
    resumed = restored.poll()
    expected = reference.poll()
    assert [(g.group_id, g.prompt_text) for g in resumed] == [(g.group_id, g.prompt_text) for g in expected]
    clock.advance(100)
    assert {g.group_id for g in restored.poll()} == set(restored.outstanding)  # restored leases expire
    with pytest.raises(ValueError, match="saved seed=0 but the config has seed=1"):
        make_source(tmp_path / "d", seed=1).load_state_dict(source.state_dict())


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_datasets_with_custom_field_names(tmp_path):
    rows = [{"question": f"{i}+1=", "solution": i + 1, "extra": True} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": [r["question"] for r in rows],
                             "solution": [str(r["solution"]) for r in rows]}), parquet)
    for path in (jsonl, parquet):
        loaded = load_dataset(path, "question", "solution")
        assert loaded.rows == [(f"{i}+1=", str(i + 1)) for i in range(5)]
        source = make_source(tmp_path / path.suffix, dataset_path=str(path), prompt_field="question",
                             answer_field="solution", task="math", epochs=1, groups_per_step=5)
        groups = source.poll()
        assert sorted((g.prompt_text, g.answer) for g in groups) == sorted(loaded.rows)
        assert all(g.task == "math" for g in groups)
        source.on_progress(Progress(1, 1, [g.group_id for g in groups]))
        assert source.poll() == [] and source.exhausted


def test_bad_rows_name_file_line_and_field(tmp_path):
    cases = [
        ('{"q": "1+1=", "a": "2"}\n{"q": "2+2="}', r"bad\.jsonl line 2: missing field 'a'"),
        ('{"q": "1+1=", "a": "2"}\n\n{"q": 5, "a": "2"}', r"bad\.jsonl line 3: field 'q' must be a non-empty string"),
        ('{"q": "1+1=", "a": [2]}', r"bad\.jsonl line 1: field 'a' must be a string or a number"),
        ('{"q": "1+1=", "a": "2"}\n{not json', r"bad\.jsonl line 2: invalid JSON"),
        ('[1, 2]', r"bad\.jsonl line 1: expected an object"),
    ]
    for text, pattern in cases:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(DatasetError, match=pattern):
            load_dataset(tmp_path / "bad.jsonl", "q", "a")
    pq.write_table(pa.table({"q": ["1+1=", None], "a": ["2", "4"]}), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match=r"bad\.parquet row 1 \(0-based\): field 'q' must be a non-empty string"):
        load_dataset(tmp_path / "bad.parquet", "q", "a")
    with pytest.raises(DatasetError, match=r"bad\.parquet: no column 'answer' \(columns: 'q', 'a'\)"):
        load_dataset(tmp_path / "bad.parquet", "q", "answer")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "missing.jsonl")
    write_jsonl(tmp_path / "mixed.jsonl", [{"q": "1+1=", "a": "2"}, "{oops", {"q": "3+3=", "a": 6}])
    loaded = load_dataset(tmp_path / "mixed.jsonl", "q", "a", skip_bad_rows=True)
    assert loaded.rows == [("1+1=", "2"), ("3+3=", "6")] and len(loaded.bad_rows) == 1
    assert "mixed.jsonl line 2: invalid JSON" in loaded.bad_rows[0]


def test_a_restarted_learner_is_recognised_by_its_epoch_when_its_first_progress_is_missed(tmp_path):
    """Epoch 1 trained steps 1-3 (checkpoint 1) and died. Epoch 2 resumed step 1; the source
    missed its first messages and first hears of it at step 4, past the old step 3, with a
    newer checkpoint (4) already: the rollback point is still the resume step."""
    source = make_source(tmp_path, lease_seconds=1e9)
    trained = {}
    for step in (1, 2, 3):
        batch = [g.group_id for g in source.poll()[:2]]
        trained[step] = batch
        source.on_progress(Progress(step, step, batch, [], checkpoint_step=1, learner_epoch=1, resumed_step=0))
    new = [g.group_id for g in source.poll()]
    source.on_progress(Progress(4, 4, new[:2], [], checkpoint_step=4, learner_epoch=2, resumed_step=1))
    again = {line["group_id"] for line in read_issued(tmp_path) if line["reason"] == "rollback"}
    assert again == set()  # reissued at the next poll
    source.poll()
    again = {line["group_id"] for line in read_issued(tmp_path) if line["reason"] == "rollback"}
    assert again == set(trained[2] + trained[3])
    assert not set(new[:2]) & set(source.outstanding) and source.progress_epoch == 2
    source.on_progress(Progress(3, 3, [], [], checkpoint_step=1, learner_epoch=1))  # late: the dead one's
    assert source.progress_epoch == 2 and source.counters["reissued_rollback"] == 4


def test_a_failure_notice_is_resent_until_the_learner_answers_it(tmp_path):
    clock = FakeClock()
    source = make_source(tmp_path, clock=clock, groups_per_step=1, max_staleness=0, max_attempts=1)
    (group,) = source.poll()
    clock.advance(10)
    (fresh,) = source.poll()  # lease expired at max_attempts: abandoned, its credit reused
    (notice,) = source.take_failed()
    source.on_progress(Progress(1, 1, [fresh.group_id], [], learner_epoch=1))
    assert group.group_id in source.failing and source.next_lease_expiry() == clock.now + 10
    clock.advance(10)  # no answer within a lease: sent again
    (fresh,) = source.poll()
    assert source.take_failed() == [notice] and source.counters["failure_notices_resent"] == 1
    source.on_progress(Progress(2, 2, [fresh.group_id], [], learner_epoch=1))
    source.on_progress(Progress(1, 1, [], [], learner_epoch=2))  # a new learner: it lost its inbox
    source.poll()
    assert source.take_failed() == [notice]
    restored = make_source(tmp_path / "r", clock=clock, groups_per_step=1, max_staleness=0, max_attempts=1)
    restored.load_state_dict(json.loads(json.dumps(source.state_dict())))
    assert restored.failing.keys() == {group.group_id} and restored.progress_epoch == 2
    for src in (source, restored):
        src.on_progress(Progress(1, 1, [], [DroppedGroup(group.group_id, "duplicate")], learner_epoch=2))
        assert not src.failing
        src.take_failed()
