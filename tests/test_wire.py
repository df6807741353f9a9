"""flower.wire: every writer's message parses back into the record it was written from, and a malformed one is
refused with WireError naming what is wrong (or, for a module payload, kept as a problem for intake to refuse)."""

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]'")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedfactory.federation.intake import counts_limit  # noqa: E402
from fedfactory.federation.records import CountsReply, ExpertReply, Payload, TrainReply  # noqa: E402
from fedfactory.flower import wire  # noqa: E402
from fedfactory.flower.wire import (  # noqa: E402
    CLIENT,
    COUNTS,
    MODULES,
    RELEASE,
    TASK,
    EvaluateTask,
    ExpertTask,
    TrainTask,
    WireError,
    classifier_content,
    counts_content,
    expert_reply_content,
    expert_task_content,
    module_array,
    parse_counts_reply,
    parse_evaluate_task,
    parse_expert_reply,
    parse_task,
    parse_train_reply,
    reply_content,
    site_error_content,
    site_reply_content,
    task_content,
)
from fedfactory.metrics import score_counts  # noqa: E402

MODULES_SENT = {"client-000_class-001": b"first module file", "client-000_class-004": b"second"}
RECORD = {"module_id": "client-000_class-001", "released": True}


def test_every_server_message_parses_back():
    assert parse_task(task_content("h", ["a_class-001"])) == TrainTask("h", ("a_class-001",), None)
    assert parse_task(task_content("h", ["a_class-001"], [12])) == TrainTask("h", ("a_class-001",), (12,))
    assert parse_task(task_content("h", [])) == TrainTask("h", (), None)
    assert parse_task(expert_task_content("h", 0.75, MODULES_SENT)) == ExpertTask(
        "h", 0.75, tuple(Payload(mid, data) for mid, data in MODULES_SENT.items()))
    weights = {"site-a": b"expert a", "site-b": b"expert b"}
    held = {"site-a": [3, 0], "site-b": [0, 5]}
    assert parse_evaluate_task(classifier_content(weights, "h", 0.5, held)) == EvaluateTask("h", 0.5, weights, held)
    assert parse_evaluate_task(classifier_content({"classifier": b"w"}, "h", 0.0)) == EvaluateTask(
        "h", 0.0, {"classifier": b"w"}, {})


def test_every_node_reply_parses_back():
    payloads = tuple(Payload(mid, data) for mid, data in MODULES_SENT.items())
    assert parse_train_reply(reply_content(3, "h", MODULES_SENT, 1.5, [RECORD])) == TrainReply(
        3, "h", payloads, 1.5, release=[RECORD])
    site = site_reply_content("site-a", "h", {"cat": 40, "dog": 2}, MODULES_SENT, 2.0, 17, [RECORD])
    assert parse_train_reply(site) == TrainReply("site-a", "h", payloads, 2.0, ("cat", "dog"), (40, 2), 17,
                                                 release=[RECORD])
    assert parse_train_reply(site_error_content("site-a", "h", "fix image 3")) == TrainReply(
        "site-a", "h", error="fix image 3")
    # A site whose training failed in local mode's second round answers with the same error reply.
    assert parse_expert_reply(site_error_content("site-a", "h", "oops")) == ExpertReply("site-a", "h", {},
                                                                                       error="oops")
    assert parse_expert_reply(expert_reply_content("site-a", "h", b"weights", 4.0)) == ExpertReply(
        "site-a", "h", {"site-a": b"weights"}, 4.0)
    rng = np.random.default_rng(0)
    counts = score_counts(rng.dirichlet(np.ones(3), 20), rng.integers(0, 3, 20), 3)
    parsed = parse_counts_reply(counts_content("site-a", "h", counts, 0.5), 3, "site site-a")
    assert (parsed.site, parsed.config_hash, parsed.seconds) == ("site-a", "h", 0.5)
    assert {k: v.tolist() for k, v in parsed.counts.items()} == {k: v.tolist() for k, v in counts.items()}
    assert isinstance(parsed, CountsReply)


def with_info(content: RecordDict, **entries) -> RecordDict:
    """The same message with CLIENT entries replaced (None removes one)."""
    info = {k: v for k, v in (dict(content.config_records[CLIENT]) | entries).items() if v is not None}
    content.config_records[CLIENT] = ConfigRecord(info)
    return content


@pytest.mark.parametrize("content, match", [
    (RecordDict({MODULES: ArrayRecord()}), "lacks the 'fedfactory-client' ConfigRecord or the 'modules' ArrayRecord"),
    (with_info(reply_content(0, "h", {}, 1.0), **{"client-id": "0"}), "'client-id' entry must be int, got str"),
    (with_info(reply_content(0, "h", {}, 1.0), **{"client-id": True}), "'client-id' entry must be int, got bool"),
    (with_info(reply_content(0, "h", {}, 1.0), site="site-a"), "exactly one of 'client-id' .* and 'site'"),
    (with_info(reply_content(0, "h", {}, 1.0), **{"client-id": None}), "exactly one of 'client-id'"),
    (with_info(reply_content(0, "h", {}, 1.0), **{"config-hash": None}), "lacks the 'config-hash' entry"),
    (with_info(reply_content(0, "h", {}, 1.0), **{"train-seconds": "fast"}), "'train-seconds' entry must be float"),
    (with_info(site_reply_content("site-a", "h", {"cat": 4}, {}, 1.0), counts=["4"]), "'counts' entry must be a list"),
    (with_info(site_reply_content("site-a", "h", {"cat": 4}, {}, 1.0), classes=[1]), "'classes' entry must be a list"),
    (with_info(site_reply_content("site-a", "h", {"cat": 4}, {}, 1.0), **{"test-images": 1.5}),
     "'test-images' entry must be int, got float"),
    (with_info(site_error_content("site-a", "h", "e"), error=3), "'error' entry must be str"),
])
def test_a_malformed_train_reply_is_refused_naming_the_entry(content, match):
    with pytest.raises(WireError, match=match):
        parse_train_reply(content)


def test_a_bad_module_payload_or_release_entry_is_kept_as_a_problem_not_parsed(monkeypatch):
    content = reply_content(0, "h", MODULES_SENT, 1.0)
    content.array_records[MODULES]["client-000_class-009"] = Array(dtype="uint8", shape=(4,), stype="numpy.ndarray",
                                                                   data=b"\x80\x04ab")
    content.array_records[MODULES]["client-000_class-008"] = Array(dtype="uint8", shape=(9,), stype=wire.MODULE_STYPE,
                                                                   data=b"abc")
    reply = parse_train_reply(content)
    assert [p.module_id for p in reply.modules if p.problem is None] == list(MODULES_SENT)
    bad = {p.module_id: p for p in reply.modules if p.problem is not None}
    assert bad["client-000_class-009"].problem.startswith("payload is stype 'numpy.ndarray', not")
    assert bad["client-000_class-008"].problem.startswith("payload shape (9,) does not describe its 3 bytes")
    assert all(p.data == b"" for p in bad.values())
    # A payload over the size limit is refused on its length alone (lowered here to stay small).
    monkeypatch.setattr(wire, "MAX_FILE_BYTES", 16)
    big = parse_train_reply(reply_content(0, "h", MODULES_SENT, 1.0)).modules[0]
    assert big.problem == "payload of 17 bytes is over the limit of 16 bytes; send module_to_bytes output"
    monkeypatch.undo()
    # Release records that do not decode are a problem of the reply, whose modules are still judged.
    for raw, problem in [("[{", "is not JSON"), (3, "must be a JSON string"), ("x" * (wire.MAX_RELEASE_CHARS + 1),
                                                                                 "at most")]:
        reply = parse_train_reply(with_info(reply_content(0, "h", MODULES_SENT, 1.0), **{RELEASE: raw}))
        assert reply.release is None and problem in reply.release_problem and len(reply.modules) == 2
    assert parse_train_reply(with_info(reply_content(0, "h", {}, 1.0), **{RELEASE: None})).release_problem is None


def test_malformed_server_messages_and_expert_and_counts_replies_are_refused():
    with pytest.raises(WireError, match="the train message lacks the 'fedfactory-task' ConfigRecord"):
        parse_task(RecordDict({}))
    task = task_content("h", [])
    task.config_records[TASK] = ConfigRecord({"config-hash": "h", "skip": [1, 2]})
    with pytest.raises(WireError, match="'skip' entry must be a list of str"):
        parse_task(task)
    evaluate = classifier_content({"classifier": b"w"}, "h", 0.0)
    evaluate.array_records["classifier"]["classifier"] = module_array(b"w")
    with pytest.raises(WireError, match="'classifier' is not a 'fedfactory.classifier' payload"):
        parse_evaluate_task(evaluate)
    expert = expert_reply_content("site-a", "h", b"w", 1.0)
    expert.array_records["classifier"]["site-a"] = Array(dtype="uint8", shape=(1,), stype="numpy.ndarray", data=b"w")
    with pytest.raises(WireError, match="not a 'fedfactory.classifier' payload"):
        parse_expert_reply(expert)
    with pytest.raises(WireError, match="the expert reply lacks the 'fedfactory-client' ConfigRecord"):
        parse_expert_reply(RecordDict({}))
    counts = counts_content("site-a", "h", {"confusion": np.zeros((3, 3), np.int64)}, 1.0)
    with pytest.raises(WireError, match="site site-x: the evaluate reply lacks the 'fedfactory-client' ConfigRecord "
                                        "or the 'counts' ArrayRecord"):
        parse_counts_reply(RecordDict({COUNTS: counts.array_records[COUNTS]}), 3, "site site-x")
    counts.array_records[COUNTS]["positive"] = module_array(b"x")
    with pytest.raises(WireError, match="site site-x: counts 'positive' is not a numpy array"):
        parse_counts_reply(counts, 3, "site site-x")
    counts.array_records[COUNTS]["positive"] = Array(dtype="int64", shape=(3, 3), stype="numpy.ndarray",
                                                     data=b"not npy")
    with pytest.raises(WireError, match="site site-x: counts 'positive' do not decode"):
        parse_counts_reply(counts, 3, "site site-x")
    counts.array_records[COUNTS]["positive"] = Array(dtype="int64", shape=(3, 3), stype="numpy.ndarray",
                                                     data=b"\0" * (counts_limit(3) + 1))
    with pytest.raises(WireError, match=r"counts 'positive': payload of \d+ bytes is over the limit"):
        parse_counts_reply(counts, 3, "site site-x")

