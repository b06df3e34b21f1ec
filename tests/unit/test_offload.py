"""HostOffloader on plain tensors: storages move and come back bit-identically, views stay views, buckets."""
import pytest
import torch

from megatron_minio3.workers.actor.offload import (
    ActorStateOffloader,
    HostOffloader,
    plan_buckets,
    storage_key,
    unique_storages,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def nbytes(tensor):
    return tensor.untyped_storage().nbytes()


def test_plan_buckets_groups_in_order_and_isolates_large_items():
    assert plan_buckets([], 10) == []
    assert plan_buckets([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert plan_buckets([4, 20, 4], 8) == [[0], [1], [2]]
    assert plan_buckets([3, 3, 3], 100) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([1], 0)


def test_unique_storages_deduplicates_views_and_skips_empty_and_other_devices():
    base = torch.arange(12.0)
    other = torch.ones(3)
    tensors = [base[2:5], base.view(3, 4), other, base, torch.empty(0), torch.ones(2, device="meta")]
    storages = unique_storages(tensors, "cpu")
    assert [key for key, _ in storages] == [storage_key(base), storage_key(other)]
    with pytest.raises(ValueError, match="expected tensors"):
        unique_storages([base, "not a tensor"], "cpu")


def test_round_trip_is_bit_identical_and_views_stay_views():
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=generator).to(DEVICE)
    weight, bias = flat[:900].view(30, 30), flat[900:]  # two views of one buffer (like megatron DDP's)
    moments = torch.randn(64, 8, generator=generator).to(torch.bfloat16).to(DEVICE)
    step = torch.tensor(3.0, device=DEVICE)
    tensors = [weight, bias, moments, step, flat]
    snapshot = [t.clone() for t in tensors]
    offloader = HostOffloader(tensors, bucket_bytes=1024)

    stats = offloader.offload()
    assert offloader.offloaded
    assert stats.num_storages == 3 and stats.num_bytes == 4000 + 1024 + 4
    assert stats.num_buckets == 3  # 4000 B, 1024 B, 4 B: none fits with another under 1024 B
    assert all(nbytes(t) == 0 for t in tensors)
    assert offloader.host_bytes == stats.num_bytes

    back = offloader.reload()
    assert not offloader.offloaded and back.num_bytes == stats.num_bytes
    for tensor, expected in zip(tensors, snapshot):
        assert torch.equal(tensor, expected)
    # still views of one storage: writing through one is seen by the other
    assert storage_key(weight) == storage_key(bias) == storage_key(flat)
    bias.fill_(7.0)
    assert torch.equal(flat[900:], torch.full((100,), 7.0, device=DEVICE))


def test_double_offload_and_reload_when_not_offloaded_are_no_ops():
    tensor = torch.arange(10.0, device=DEVICE)
    offloader = HostOffloader([tensor])
    assert offloader.reload().num_storages == 0  # not offloaded: nothing to do
    assert offloader.offload().num_storages == 1
    assert offloader.offload().num_storages == 0  # already offloaded: nothing moves, the host copy stays
    assert offloader.reload().num_storages == 1
    assert offloader.reload().num_storages == 0
    assert torch.equal(tensor, torch.arange(10.0, device=DEVICE))


def test_empty_list_and_empty_tensors_move_nothing():
    for tensors in ([], [torch.empty(0, device=DEVICE)]):
        offloader = HostOffloader(tensors)
        stats = offloader.offload()
        assert (stats.num_storages, stats.num_bytes, stats.num_buckets) == (0, 0, 0)
        assert offloader.reload().num_bytes == 0
        assert offloader.host_bytes == 0


def test_host_buffers_are_reused_and_new_tensors_are_picked_up_at_the_next_offload():
    params = [torch.randn(100, device=DEVICE)]
    state: dict[str, torch.Tensor] = {}  # like Adam's, created lazily
    offloader = HostOffloader(lambda: params + list(state.values()), bucket_bytes=256)
    assert offloader.offload().num_storages == 1
    offloader.reload()
    host_ptr = next(iter(offloader._host.values())).data_ptr()

    params[0].add_(1.0)  # changed between round trips: the new values are what comes back
    expected = params[0].clone()
    state["exp_avg"] = torch.randn(50, device=DEVICE)
    expected_state = state["exp_avg"].clone()
    assert offloader.offload().num_storages == 2
    assert offloader._host[(storage_key(params[0]), 400)].data_ptr() == host_ptr  # reused, not reallocated
    offloader.reload()
    assert torch.equal(params[0], expected) and torch.equal(state["exp_avg"], expected_state)

    del state["exp_avg"]  # a storage that is gone: its host buffer is dropped at the next offload
    offloader.offload()
    offloader.reload()
    assert offloader.host_bytes == 400
    with pytest.raises(ValueError, match="while offloaded"):
        offloader.offload()
        offloader.release_host_buffers()
    offloader.reload()
    assert offloader.release_host_buffers() == 400 and offloader.host_bytes == 0


def test_storage_already_freed_by_another_offloader_is_skipped():
    tensor = torch.randn(8, device=DEVICE)
    first, second = HostOffloader([tensor]), HostOffloader([tensor])
    first.offload()
    assert second.offload().num_storages == 0
    second.reload()
    first.reload()
    assert nbytes(tensor) == 32


def test_not_resizable_storage_is_refused_before_anything_moves():
    if DEVICE != "cpu":
        pytest.skip("a non-resizable storage is made from a host buffer here")
    owned = torch.randn(4)
    borrowed = torch.frombuffer(bytearray(16), dtype=torch.float32)
    offloader = HostOffloader([owned, borrowed])
    with pytest.raises(ValueError, match="not resizable"):
        offloader.offload()
    assert nbytes(owned) == 16 and not offloader.offloaded


def test_bad_bucket_bytes_is_a_value_error():
    with pytest.raises(ValueError, match="bucket_bytes"):
        HostOffloader([], bucket_bytes=0)


class _AdamLike:
    """The parts of a torch Adam the collectors read: param groups and per-param state."""

    def __init__(self, params):
        self.param_groups = [{"params": params, "lr": 0.1}]
        self.state = {}

    def step(self):  # creates the state lazily, like torch's Adam
        for p in self.param_groups[0]["params"]:
            self.state[p] = {"step": torch.tensor(1.0), "exp_avg": p.grad.clone(), "exp_avg_sq": p.grad.square()}


class _TinyOptimizer:
    """Shaped like megatron's Float16OptimizerWithFloat16Params: fp32 main params in the torch optimizer."""

    def __init__(self, model):
        self.fp32_from_float16_groups = [[p.detach().float() for p in model.parameters()]]
        self.optimizer = _AdamLike(self.fp32_from_float16_groups[0])


def test_actor_state_groups_are_disjoint_and_switchable():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16).to(DEVICE)
    for param in model.parameters():
        param.main_grad = torch.randn(param.shape, device=DEVICE)
    optimizer = _TinyOptimizer(model)
    for main, param in zip(optimizer.fp32_from_float16_groups[0], model.parameters()):
        main.grad = param.main_grad  # megatron: main_param.grad = model_param.main_grad.float() (the same tensor)
    optimizer.optimizer.step()  # Adam state now exists
    everything = list(model.parameters()) + [p.main_grad for p in model.parameters()]
    everything += optimizer.fp32_from_float16_groups[0]
    everything += [v for s in optimizer.optimizer.state.values() for v in s.values()]
    snapshot = [t.clone() for t in everything]

    offloader = ActorStateOffloader(model, optimizer, bucket_bytes=64)
    moved = offloader.offload(params=False)  # grads + optimizer first (the trainer's order)
    assert set(moved) == {"grads", "optimizer"}
    assert moved["grads"].num_storages == 2  # main grads once, although main params' .grad are the same
    # optimizer: 2 fp32 main params + (exp_avg, exp_avg_sq, and, on CPU, step: a CPU tensor) per param
    assert moved["optimizer"].num_storages == 2 + 2 * (3 if DEVICE == "cpu" else 2)
    assert all(nbytes(p) > 0 for p in model.parameters())
    assert offloader.offloaded == {"params": False, "grads": True, "optimizer": True}
    assert offloader.offload(params=True)["params"].num_storages == 2
    assert all(nbytes(t) == 0 for t in everything if t.device.type == DEVICE)

    offloader.reload(params=True, grads=False, optimizer=False)
    assert offloader.offloaded == {"params": False, "grads": True, "optimizer": True}
    offloader.reload()
    for tensor, expected in zip(everything, snapshot):
        assert torch.equal(tensor, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_frees_device_memory_and_uses_pinned_host_buffers():
    tensor = torch.randn(16 << 20, device="cuda")  # 64 MiB
    expected = tensor.clone()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    offloader = HostOffloader([tensor], bucket_bytes=16 << 20)
    offloader.offload()
    assert torch.cuda.memory_allocated() <= allocated - (64 << 20)
    assert all(buffer.is_pinned() for buffer in offloader._host.values())
    offloader.reload()
    assert torch.equal(tensor, expected)


def test_a_reload_that_fails_part_way_can_be_finished_later(monkeypatch):
    tensors = [torch.full((64,), float(i), device=DEVICE) for i in range(4)]  # 256 B each: one per bucket
    offloader = HostOffloader(tensors, bucket_bytes=256)
    offloader.offload()
    real_resize, calls = torch.UntypedStorage.resize_, []

    def failing_resize(storage, size):
        calls.append(size)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real_resize(storage, size)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", failing_resize)
    with pytest.raises(RuntimeError, match="simulated"):
        offloader.reload()
    monkeypatch.undo()
    assert offloader.offloaded and [nbytes(t) for t in tensors] == [256, 256, 0, 0]
    assert offloader.reload().num_storages == 2
    for i, tensor in enumerate(tensors):
        assert torch.equal(tensor, torch.full((64,), float(i), device=DEVICE))
