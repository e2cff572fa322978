"""MoCo v2: logits, momentum update, queue bookkeeping, learning, and a queue shared by all DDP ranks."""

from __future__ import annotations

import copy
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dp4tl_ray.errors import UserError
from dp4tl_ray.models import ModelSpec
from dp4tl_ray.train.moco import MoCoV2, ddp_kwargs

SPEC = ModelSpec("resnet18", small_input=True)
SIDE = 8  # tiny images keep a resnet18 step well under a second on CPU

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def moco() -> MoCoV2:
    return MoCoV2(SPEC, dim=16, K=32, m=0.9)


def test_logits_have_the_positive_first_then_k_negatives(moco):
    model = copy.deepcopy(moco)
    logits, labels = model(_images(8, 0), _images(8, 1))
    assert logits.shape == (8, 1 + 32) and logits.dtype == torch.float32
    assert labels.shape == (8,) and not labels.any()
    assert float(logits.detach().abs().max()) <= 1 / model.T + 1e-4  # cosine similarities / T


def test_queue_pointer_advances_and_wraps(moco):
    model = copy.deepcopy(moco)
    ptrs = []
    with torch.no_grad():
        for step in range(5):
            model(_images(8, step), _images(8, step + 1))
            ptrs.append(int(model.queue_ptr))
    assert ptrs == [8, 16, 24, 0, 8]


def test_key_encoder_moves_towards_the_query_encoder_by_momentum(moco):
    model = copy.deepcopy(moco)
    with torch.no_grad():  # make the two encoders differ first
        for p in model.encoder_q.parameters():
            p.add_(0.01)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    query = [p.clone() for p in model.encoder_q.parameters()]
    model(_images(8, 0), _images(8, 1))
    for pk, old, pq in zip(model.encoder_k.parameters(), before_k, query):
        torch.testing.assert_close(pk, 0.9 * old + 0.1 * pq)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())


def _step_recording_key_groups(model: MoCoV2, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """One step; per call of the key encoder, which of ``im_k``'s images it got (in the order given),
    and the batch size its first BatchNorm layer normalised."""
    groups, bn_batches = [], []
    hooks = [model.encoder_k.register_forward_pre_hook(
                 lambda _, args: groups.append([int((im_k == x).flatten(1).all(1).nonzero()) for x in args[0]])),
             model.encoder_k.net.bn1.register_forward_pre_hook(lambda _, args: bn_batches.append(len(args[0])))]
    try:
        model(im_q, im_k)
    finally:
        for h in hooks:
            h.remove()
    return groups, bn_batches


def _keys_by_group(encoder: torch.nn.Module, im_k: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Normalised keys of ``im_k`` in its order, each group through ``encoder`` (and its BN) on its own."""
    keys = [None] * len(im_k)
    with torch.no_grad():
        for g in groups:
            for i, k in zip(g, F.normalize(encoder(im_k[g]), dim=1)):
                keys[i] = k
    return torch.stack(keys)


def test_queue_holds_the_normalised_keys_after_a_step(moco):
    model = copy.deepcopy(moco)
    reference = copy.deepcopy(model)
    im_k = _images(8, 1)
    old_rest = model.queue[:, 8:].clone()
    groups, _ = _step_recording_key_groups(model, _images(8, 0), im_k)
    with torch.no_grad():
        reference._momentum_update()
    keys = _keys_by_group(reference.encoder_k, im_k, groups)
    torch.testing.assert_close(model.queue[:, :8], keys.T)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(32))
    assert torch.equal(model.queue[:, 8:], old_rest)


def test_one_worker_key_bn_sees_shuffled_sub_batches_and_keys_come_back_in_order(moco):
    """Shuffle-BN without DDP: >= 2 BN groups of a shuffled key batch, as on separate GPUs."""
    torch.manual_seed(0)
    model = copy.deepcopy(moco)
    im_k = _images(8, 1)
    seen = []
    for step in range(4):
        reference = copy.deepcopy(model)
        groups, bn_batches = _step_recording_key_groups(model, _images(8, step), im_k)
        assert len(groups) >= 2 and bn_batches == [len(g) for g in groups] and max(bn_batches) < 8
        assert sorted(i for g in groups for i in g) == list(range(8))  # every key once, none twice
        seen.append([sorted(g) for g in groups])
        with torch.no_grad():
            reference._momentum_update()
        # the queue's newest keys are image i's key from its own group, at position i
        ptr = 8 * step
        torch.testing.assert_close(model.queue[:, ptr:ptr + 8], _keys_by_group(reference.encoder_k, im_k, groups).T)
    contiguous = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert any(g != contiguous for g in seen) and len({str(g) for g in seen}) > 1  # shuffled, differently each step
    big = MoCoV2(SPEC, dim=16, K=64, m=0.9, bn_group=8)
    groups, _ = _step_recording_key_groups(big, _images(32, 0), _images(32, 1))
    assert [len(g) for g in groups] == [8, 8, 8, 8]  # about bn_group images per group


def test_training_steps_lower_the_infonce_loss_on_a_repeated_batch(moco):
    """SGD on one fixed batch against a fixed queue and key shuffle: the InfoNCE gradient must point downhill."""
    model = copy.deepcopy(moco)
    model.m = 0.999
    queue = model.queue.clone()
    im_q, im_k = _images(8, 0), (_images(8, 0) + 0.2 * _images(8, 1)).clamp(0, 1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
    losses = []
    for _ in range(6):
        model._shuffle_gen = torch.Generator().manual_seed(0)  # the same key shuffle (BN groups) every step
        loss = F.cross_entropy(*model(im_q, im_k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.queue.copy_(queue)
        model.queue_ptr.zero_()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_logits_stay_float32_under_bf16_autocast(moco):
    model = copy.deepcopy(moco)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(_images(8, 0), _images(8, 1))
    assert logits.dtype == torch.float32 and model.queue.dtype == torch.float32


def test_a_batch_that_does_not_divide_k_is_a_clear_error(moco):
    with pytest.raises(UserError, match="multiple of the global batch 6"):
        copy.deepcopy(moco)(_images(6, 0), _images(6, 1))


def test_backbone_state_dict_is_a_torchvision_net_with_an_mlp_head(moco):
    state = moco.backbone_state_dict()
    assert state.keys() == moco.encoder_q.net.state_dict().keys()
    assert state["fc.0.weight"].shape == (512, 512) and state["fc.2.weight"].shape == (16, 512)
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One DDP rank: check shuffle-BN keys in eval mode, then 3 training steps on rank-specific data."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a failed peer ends the test instead of hanging it
    try:
        model = MoCoV2(SPEC, dim=8, K=32)  # 4 images per rank: a global batch of 8
        model.eval()  # BN on running statistics: keys no longer depend on the shuffle
        x = _images(4, 100 + rank)
        k_local, k_all = model._keys(x)
        with torch.no_grad():
            plain = F.normalize(model.encoder_k(x), dim=1)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # ddp_kwargs uses the current spelling
            ddp = DistributedDataParallel(model, **ddp_kwargs())
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.05)
        for step in range(3):
            im = _images(4, 10 * step + rank)
            loss = F.cross_entropy(*ddp(im, im.flip(3)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"k_local": k_local, "k_all": k_all, "plain": plain, "queue": model.queue, "ptr": model.queue_ptr,
                    "key_params": [p.detach() for p in model.encoder_k.parameters()]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_queue_is_identical_on_every_rank(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    # shuffle-BN: the shuffled, unshuffled keys are each rank's own keys, in rank order
    torch.testing.assert_close(r0["k_local"], r0["plain"])
    torch.testing.assert_close(r1["k_local"], r1["plain"])
    torch.testing.assert_close(r0["k_all"], torch.cat([r0["plain"], r1["plain"]]))
    # after 3 steps of different data per rank: the same queue, pointer and key encoder everywhere
    assert int(r0["ptr"]) == int(r1["ptr"]) == 24
    assert torch.equal(r0["queue"], r1["queue"])
    assert not torch.equal(r0["queue"][:, :24], MoCoV2(SPEC, dim=8, K=32).queue[:, :24])
    assert all(torch.equal(a, b) for a, b in zip(r0["key_params"], r1["key_params"]))
