"""Reading the broker's per-topic answers, and the one line a refusal becomes."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.errors import InvalidReplicationFactorError, NotControllerError

from llm_usage.kafka.topics import TopicRefusal, refusal, topic_errors


@dataclass
class Answer:
    topic_errors: list[tuple[object, ...]]


def test_every_version_of_the_answer_is_read_and_successes_are_left_out() -> None:
    v0 = Answer([("a", 0), ("b", 38)])  # CreateTopics v0 carries no message
    v1 = Answer([("a", 0, None), ("b", 38, "only 1 broker(s) are registered.")])

    assert topic_errors(v0) == [TopicRefusal("b", 38, None)]
    assert topic_errors(v1) == [TopicRefusal("b", 38, "only 1 broker(s) are registered.")]


def test_a_refusal_is_one_line_naming_the_topic_the_code_and_what_to_do() -> None:
    error = TopicRefusal("usage", InvalidReplicationFactorError.errno, "only 1 broker(s).")

    message = str(refusal("create", error, brokers=1))

    assert message == (
        "Kafka refused to create topic 'usage' (INVALID_REPLICATION_FACTOR: only 1 broker(s).); "
        "pass --replication-factor no larger than the number of brokers (1)"
    )


def test_an_unknown_code_still_names_itself_and_points_at_the_broker_log() -> None:
    message = str(refusal("grow", TopicRefusal("usage", 9999, None), brokers=3))

    assert message.startswith("Kafka refused to grow topic 'usage' (UNKNOWN")
    assert "broker's log" in message
    assert "\n" not in message


def test_retriable_codes_are_told_apart() -> None:
    assert TopicRefusal("t", NotControllerError.errno, None).retriable
    assert not TopicRefusal("t", InvalidReplicationFactorError.errno, None).retriable
