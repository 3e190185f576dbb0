"""A tenant whose ring cannot be opened is refused alone; the daemon serves the rest."""

import os

import pytest

from ringtail.service.client import Client, RingtailError
from ringtail.service.protocol import ErrorCode


async def test_a_garbage_ring_file_makes_only_its_tenant_unavailable(daemon, tmp_path,
                                                                     record_factory):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    garbage = bytes(range(256)) * 64
    (data_dir / "tenant-5.ring").write_bytes(garbage)
    process = daemon(data_dir=os.fspath(data_dir))
    assert "tenant 5 unavailable" in process.stderr
    assert "not a ringtail ring file" in process.stderr

    with pytest.raises(RingtailError) as caught:
        await Client.connect(process.socket_path, 5)
    assert caught.value.code == ErrorCode.TENANT_UNAVAILABLE
    assert "tenant-5.ring" in caught.value.message
    assert "not a ringtail ring file" in caught.value.message

    records = record_factory(6).records(10)
    async with await Client.connect(process.socket_path, 6) as client:
        ack = await client.publish(records)
    assert (ack.first_sequence, ack.last_sequence) == (0, 9)
    assert process.alive
    assert (data_dir / "tenant-5.ring").read_bytes() == garbage  # never overwritten


async def test_a_new_tenant_whose_ring_cannot_be_created_is_refused_alone(daemon, tmp_path,
                                                                        record_factory):
    """Creation fails for real (a directory sits where the ring is built); the
    daemon answers TENANT_UNAVAILABLE and goes on serving (docs/OPERATIONS.md)."""
    data_dir = tmp_path / "data"
    (data_dir / "tenant-9.ring.creating" / "in-the-way").mkdir(parents=True)
    process = daemon(data_dir=os.fspath(data_dir), io="threads")
    with pytest.raises(RingtailError) as caught:
        await Client.connect(process.socket_path, 9)
    assert caught.value.code == ErrorCode.TENANT_UNAVAILABLE
    assert "tenant 9's ring cannot be opened" in caught.value.message
    assert "tenant-9.ring.creating" in caught.value.message
    async with await Client.connect(process.socket_path, 8) as client:
        ack = await client.publish(record_factory(8).records(3))
    assert (ack.first_sequence, ack.last_sequence) == (0, 2)
    assert process.alive
    assert "Traceback" not in process.stderr
