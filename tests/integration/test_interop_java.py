"""Gateways that publish with the Kafka Java client: compressed idempotent batches, transactions.

The producer is tests/interop/java/UsageProducer.java, compiled against the kafka-clients jar
among the local broker's own jars (the ones `llm-usage dev` fetches from Maven Central).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from llm_usage.core.errors import LocalServiceError
from llm_usage.local.kafka import LOG4J2_CONFIG, ensure_kafka_jars
from tests.integration.interop import (
    Event,
    assert_none_stored,
    assert_stored_exactly_once,
    consume_until_idle,
    dead_letter_ends,
    exact_charge,
)
from tests.integration.pipeline import (
    PipelineTopics,
    create_pipeline_topics,
    encode,
    read_topic,
    unique,
    usage_event,
)
from tests.unavailable import service_unavailable

SOURCE = Path(__file__).parents[1] / "interop" / "java" / "UsageProducer.java"
PARTITIONS = 3
SUMMARY = re.compile(
    r"sent (?P<sent>\d+) records to partitions \[(?P<partitions>[\d, ]*)\] "
    r"\((?P<committed>\d+) transactions committed, (?P<aborted>\d+) aborted\); "
    r"compression-rate-avg (?P<rate>[\d.]+|NaN), "
    r"records-per-request-avg (?P<per_request>[\d.]+|NaN)"
)


@dataclass(frozen=True)
class JavaProducer:
    """The compiled UsageProducer and how to launch it."""

    java: str
    classpath: str

    async def run(
        self,
        bootstrap_servers: str,
        topic: str,
        compression: str,
        script: Path,
        transactional_id: str | None = None,
    ) -> re.Match[str]:
        """Run it to the end; return the parsed summary line it prints."""
        process = await asyncio.create_subprocess_exec(
            self.java,
            # A run of a few seconds: the quick compiler and a simple GC start fastest.
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp",
            self.classpath,
            "UsageProducer",
            bootstrap_servers,
            topic,
            compression,
            str(script),
            *([transactional_id] if transactional_id else []),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 120)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError("the Java producer did not finish within 120 s") from None
        text = output.decode(errors="replace")
        assert process.returncode == 0, text
        summary = SUMMARY.search(text)
        assert summary is not None, text
        return summary


@pytest.fixture(scope="module")
def java_producer(tmp_path_factory: pytest.TempPathFactory) -> JavaProducer:
    java, javac = shutil.which("java"), shutil.which("javac")
    if java is None or javac is None:
        service_unavailable("no JDK (`java` and `javac`) on PATH: apt-get install openjdk-17-jdk")
    try:
        libs = ensure_kafka_jars()
    except LocalServiceError as error:
        service_unavailable(f"no Kafka client jars: {error}")
    assert any(libs.glob("kafka-clients-*.jar")), f"no kafka-clients jar in {libs}"
    classes = tmp_path_factory.mktemp("java-classes")
    compiled = subprocess.run(
        [javac, "-Xlint:all", "-Werror", "-d", str(classes), "-cp", str(libs / "*"), str(SOURCE)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    return JavaProducer(java=java, classpath=f"{classes}{os.pathsep}{libs / '*'}")


@pytest.fixture
async def topics(
    kafka_bootstrap_servers: str, database_url: str, pool: asyncpg.Pool
) -> PipelineTopics:
    return await create_pipeline_topics(
        bootstrap_servers=kafka_bootstrap_servers,
        database_url=database_url,
        partitions=PARTITIONS,
    )


def record_lines(events: Sequence[Event]) -> list[str]:
    """Script lines for `events`: every fourth with a null key and the client's partitioner,
    the others keyed by tenant on every partition in turn."""
    lines = []
    for sequence, event in enumerate(events):
        if sequence % 4 == 0:
            key, partition = r"\N", "-"
        else:
            key, partition = event["tenant_id"], str(sequence % PARTITIONS)
        lines.append(f"record\t{key}\t{partition}\t{encode(event).decode()}")
    return lines


def write_script(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
async def test_idempotent_compressed_batches_from_java_are_stored_exactly_once(
    compression: str,
    java_producer: JavaProducer,
    topics: PipelineTopics,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    tenants = [unique("tenant") for _ in range(3)]
    events = [
        usage_event(tenants[i % 3], customer_charge_usd=exact_charge(i)) for i in range(1, 501)
    ]
    script = write_script(tmp_path / "script.tsv", record_lines(events))

    summary = await java_producer.run(
        topics.settings.kafka_bootstrap_servers, topics.usage, compression, script
    )
    assert int(summary["sent"]) == len(events)
    assert summary["partitions"] == "0, 1, 2"
    # Real batches, really compressed (the client's own figures: compressed / raw size).
    assert float(summary["rate"]) < 0.5, summary[0]
    assert float(summary["per_request"]) > 10, summary[0]

    dead_before = await dead_letter_ends(topics)
    stopped = await consume_until_idle(topics)
    assert stopped.get("recorded") == len(events), stopped
    assert not {"dead_lettered", "conflict", "duplicate"} & set(stopped), stopped
    await assert_stored_exactly_once(pool, events)
    assert await dead_letter_ends(topics) == dead_before


async def test_java_transactions_committed_are_stored_and_aborted_never(
    java_producer: JavaProducer, topics: PipelineTopics, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenants = [unique("tenant") for _ in range(2)]
    committed: list[Event] = []
    aborted: list[Event] = []
    lines: list[str] = []
    for round_number in range(6):
        batch = [
            usage_event(tenants[i % 2], customer_charge_usd=exact_charge(100 * round_number + i))
            for i in range(1, 61)
        ]
        # Even rounds commit, odd ones abort: the topic ends with an aborted transaction.
        decision = "commit" if round_number % 2 == 0 else "abort"
        lines += ["begin", *record_lines(batch), decision]
        (committed if decision == "commit" else aborted).extend(batch)
    script = write_script(tmp_path / "script.tsv", lines)

    summary = await java_producer.run(
        topics.settings.kafka_bootstrap_servers,
        topics.usage,
        "zstd",
        script,
        transactional_id=unique("java-gateway"),
    )
    assert (summary["committed"], summary["aborted"]) == ("3", "3")
    # Aborted records are in the log; a read_uncommitted reader sees all of them.
    everything = len(committed) + len(aborted)
    in_log = await read_topic(
        topics.settings.kafka_bootstrap_servers, topics.usage, expected=everything, within=60
    )
    assert len(in_log) == everything

    dead_before = await dead_letter_ends(topics)
    stopped = await consume_until_idle(topics)
    assert stopped.get("recorded") == len(committed), stopped
    assert not {"dead_lettered", "conflict"} & set(stopped), stopped
    await assert_stored_exactly_once(pool, committed)
    await assert_none_stored(pool, aborted)
    assert await dead_letter_ends(topics) == dead_before
