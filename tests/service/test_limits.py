"""service/limits.py: the cross-module limits relate, and the memory bound adds up."""

from __future__ import annotations

from ringtail.ioring.record import RECORD_SIZE_BYTES
from ringtail.service import limits
from ringtail.service.batcher import PENDING_RECORD_COUNT_MAX
from ringtail.service.connection import CONNECTION_UNACKED_BATCH_COUNT_MAX
from ringtail.service.gate import CONNECTION_COUNT_MAX
from ringtail.service.protocol import PUBLISH_RECORD_COUNT_MAX, RECEIVE_BUFFER_BYTES_MAX
from ringtail.service.tenants import TENANT_COUNT_MAX


def test_the_worst_case_memory_is_the_sum_of_its_terms_at_their_limits():
    terms = {term.name: term for term in limits.worst_case_memory(65_536)}
    assert terms["connection receive buffer"].total_bytes == \
        CONNECTION_COUNT_MAX * RECEIVE_BUFFER_BYTES_MAX
    assert terms["publish batches unacknowledged, or a replay read"].size_bytes == \
        CONNECTION_UNACKED_BATCH_COUNT_MAX * PUBLISH_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
    assert terms["records waiting for a tenant's writer"].total_bytes == \
        TENANT_COUNT_MAX * PENDING_RECORD_COUNT_MAX * RECORD_SIZE_BYTES
    assert terms["chunk-table mirror per ring"].total_bytes == TENANT_COUNT_MAX * 65_536
    text = limits.describe_limits(65_536)
    total_mib = sum(term.total_bytes for term in terms.values()) / (1 << 20)
    assert "total" in text and f"{total_mib:,.1f} MiB" in text
    for term in terms.values():
        assert term.formula in text


def test_a_larger_ring_capacity_raises_only_the_table_term():
    small = {t.name: t.total_bytes for t in limits.worst_case_memory(65_536)}
    large = {t.name: t.total_bytes for t in limits.worst_case_memory(1 << 20)}
    assert {name for name in small if small[name] != large[name]} == \
        {"chunk-table mirror per ring"}
