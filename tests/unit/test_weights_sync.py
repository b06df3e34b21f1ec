"""Weight sync transport: the bucket-split guard, and the broadcast protocol over a real gloo weight group
(sender and receiver as two threads of this process, each with its own rank of the group)."""
from __future__ import annotations

import threading

import pytest
import torch

from megatron_minio3.parallel import free_port
from megatron_minio3.weights.bucket import Bucket, TensorEntry
from megatron_minio3.weights.sync import (
    BroadcastTarget,
    CudaIpcTarget,
    SyncStats,
    WeightGroup,
    check_bucket_stays_whole,
    receive_buckets,
)

ENTRIES = (TensorEntry("layer.q_proj.weight", (4, 4), 0), TensorEntry("layer.q_proj.bias", (4,), 16))


def test_a_bucket_the_engine_would_split_is_refused_naming_it():
    check_bucket_stays_whole(ENTRIES, 4, engine_bucket_bytes=16 * 4 + 1)  # cut only after the last tensor
    check_bucket_stays_whole(ENTRIES[:1], 4, engine_bucket_bytes=1)  # one tensor: nothing to split
    with pytest.raises(ValueError, match="bucket starting at 'layer.q_proj.weight'.*rollout.weight_bucket_mb"):
        check_bucket_stays_whole(ENTRIES, 4, engine_bucket_bytes=16 * 4)


def test_cuda_ipc_target_refuses_host_tensors_naming_them():
    target = CudaIpcTarget(send=lambda payload: pytest.fail("nothing may be sent"))
    with pytest.raises(ValueError, match="CUDA IPC weight sync needs CUDA tensors; bucket starting at 'layer.q_proj"):
        target.push(Bucket(torch.zeros(20), ENTRIES))


def test_sync_stats_metrics():
    stats = SyncStats(num_buckets=3, num_tensors=10, num_bytes=2_000_000_000, seconds=4.0)
    assert stats.gb_per_s == 0.5
    assert stats.metrics() == {
        "weights/sync_s": 4.0, "weights/sync_gb": 2.0, "weights/sync_gb_per_s": 0.5, "weights/num_buckets": 3.0
    }


def run_pair(sender, receiver):
    """sender(group rank 0) and receiver(group rank 1) on two threads; returns their results or raises."""
    port = free_port()
    results: dict[str, object] = {}

    def run(name, rank, work):
        try:
            results[name] = work(WeightGroup("127.0.0.1", port, rank, 2, timeout_s=60))
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            results[name] = exc

    threads = [threading.Thread(target=run, args=("sender", 0, sender)),
               threading.Thread(target=run, args=("receiver", 1, receiver))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "weight group threads hung"
    return results["sender"], results["receiver"]


def make_buckets() -> list[Bucket]:
    generator = torch.Generator().manual_seed(0)
    second = (TensorEntry("layer.o_proj.weight", (3, 2), 0),)
    return [Bucket(torch.randn(20, generator=generator), ENTRIES), Bucket(torch.randn(6, generator=generator), second)]


def test_broadcast_protocol_delivers_every_bucket():
    buckets = make_buckets()

    def sender(group):
        assert group.broadcast_object({"step": 7}) == {"step": 7}
        target = BroadcastTarget(group)
        target.begin([b.entries for b in buckets], torch.float32)
        for bucket in buckets:
            target.push(bucket)

    def receiver(group):
        assert group.broadcast_object() == {"step": 7}
        with pytest.raises(ValueError, match="must be rank 0 of its weight group, not rank 1"):
            BroadcastTarget(group)
        return [[(name, tensor.clone()) for name, tensor in named] for named in receive_buckets(group, 1 << 20)]

    sent, received = run_pair(sender, receiver)
    assert sent is None, sent
    assert isinstance(received, list), received
    assert [[name for name, _ in bucket] for bucket in received] == [[e.name for e in b.entries] for b in buckets]
    for bucket, got in zip(buckets, received):
        for (name, want), (_, tensor) in zip(bucket.named_tensors(), got):
            assert torch.equal(tensor, want), name


def test_an_engine_that_would_split_a_bucket_stops_the_sync_on_both_sides():
    buckets = make_buckets()

    def sender(group):
        BroadcastTarget(group).begin([b.entries for b in buckets], torch.float32)

    def receiver(group):
        list(receive_buckets(group, engine_bucket_bytes=16))

    sent, received = run_pair(sender, receiver)
    assert isinstance(sent, ValueError) and "rejected the bucket layout" in str(sent)
    assert isinstance(received, ValueError) and "'layer.q_proj.weight'" in str(received)


def test_weight_group_arguments_are_checked():
    with pytest.raises(ValueError, match="world_size >= 2"):
        WeightGroup("127.0.0.1", free_port(), 0, 1)
    with pytest.raises(ValueError, match="backend must be 'gloo' or 'nccl'"):
        WeightGroup("127.0.0.1", free_port(), 2, 3, backend="mpi")
