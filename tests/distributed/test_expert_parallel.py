"""Expert and data parallelism on 2 gloo processes (127.0.0.1), against one process doing the
same work: the layer (outputs and every gradient), a few training steps, and checkpoints that a
different number of processes loads.

The single-process references are independent of xmoe.distributed: the plain MoELayer run on
each rank's tokens in turn (routing and capacity per call, as each rank routes its own batch),
and a plain training run with grad_accum = ranks (the same micro-batches per step).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from helpers import distributed as workers
from helpers.data import write_corpus
from helpers.training import recompute_manifest
from xmoe.data import DataConfig
from xmoe.distributed import Layout
from xmoe.models.gpt import GPT
from xmoe.presets import get_preset
from xmoe.training import CheckpointError, TrainConfig, checkpoint_dir, consolidate_checkpoint, read_metrics, to_dict
from xmoe.tasks.lm import eval_batches, evaluate_lm, lm_run_config, load_lm, train_lm
from xmoe.training.checkpoint import read_state

WORLD = 2


# --- the layout (pure) ------------------------------------------------------------------


def test_layout_groups_form_a_dp_by_ep_grid() -> None:
    layout = Layout(world_size=8, ep_size=4)
    assert layout.dp_size == 2
    assert layout.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.replica_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.coords(6) == (1, 2)
    # Every rank is in exactly one group of each kind, and one ep group and one replica group
    # meet in exactly one rank.
    for groups in (layout.ep_groups(), layout.replica_groups()):
        assert sorted(r for g in groups for r in g) == list(range(8))
    for ep in layout.ep_groups():
        for rep in layout.replica_groups():
            assert len(set(ep) & set(rep)) == 1


@pytest.mark.parametrize("world, ep", [(4, 3), (2, 0), (2, 4)])
def test_layout_rejects_an_ep_size_that_does_not_divide(world: int, ep: int) -> None:
    with pytest.raises(ValueError, match="--ep-size"):
        Layout(world_size=world, ep_size=ep)


# --- the layer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_layer")
    workers.spawn(workers.run_layer_cases, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("backend", workers.BACKENDS)
@pytest.mark.parametrize("case", list(workers.LAYER_CASES))
def test_expert_parallel_layer_matches_one_process(layer_results, case: str, backend: str) -> None:
    layer, xs, gs = workers.layer_case(case, backend)
    kept = []
    for rank in range(WORLD):  # each rank's tokens, routed on their own, gradients accumulating
        x = xs[rank].clone().requires_grad_(True)
        ref = layer(x)
        (ref.output * gs[rank]).sum().add(0.1 * ref.aux_loss).backward()
        got = layer_results[rank][case, backend]
        torch.testing.assert_close(got["output"], ref.output.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["x_grad"], x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["aux_loss"], ref.aux_loss.detach())
        kept.append(int(ref.stats.tokens_per_expert.sum()))
        assert got["kept"] == kept[-1]
    # The router is replicated: its gradient is the sum of the ranks' (before any averaging).
    router = sum(layer_results[r][case, backend]["router_grad"] for r in range(WORLD))
    torch.testing.assert_close(router, layer.router.weight.grad, rtol=1e-5, atol=1e-6)
    # Experts are sharded: rank r holds experts [4r, 4r + 4) with the gradient of every token.
    for name, shard in layer_results[0][case, backend]["experts"].items():
        shard = shard if shard is not None else torch.zeros(4, *getattr(layer.experts, name).shape[1:])
        # A shard no row reached may have no gradient (loop, grouped_mm): zeros, as the sync takes it.
        grads = [layer_results[r][case, backend]["experts"][name] for r in range(WORLD)]
        full = torch.cat([torch.zeros_like(shard) if g is None else g for g in grads])
        assert shard.shape[0] == 4
        torch.testing.assert_close(full, getattr(layer.experts, name).grad, rtol=1e-5, atol=1e-6, msg=name)
    if case.endswith("zero-tokens"):
        assert kept[1] == 0  # rank 1 routed nothing, and still served rank 0's pairs
    if case.endswith("idle"):  # rank 1's experts received no row, and backward still met its peers
        assert layer.experts.w1.grad[4:].abs().sum() == 0 and layer.experts.w1.grad[0].abs().sum() > 0


# --- training, checkpoints --------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", num_lines=400)
    return path


def _config(corpus, cache, *, grad_accum: int, max_steps: int = 3, dp_impl: str = "fsdp", **train_fields):
    train = TrainConfig(max_steps=max_steps, batch_size=4, seq_len=32, grad_accum=grad_accum, eval_every=0,
                        save_every=0, log_every=1, eval_batches=3, lr=3e-3, device="cpu", dp_impl=dp_impl,
                        **train_fields)
    return lm_run_config("debug-xmoe", data=DataConfig(path=str(corpus), vocab_size=300, cache_dir=str(cache)),
                         train=train, overrides={"model.moe.capacity_factor": "2.0"})


PROBE = torch.arange(40).reshape(2, 20) * 7 % 257


@pytest.mark.parametrize("world, ep_size, dp_impl, reshard", [
    (2, 2, "fsdp", True),
    (2, 1, "fsdp", True),
    pytest.param(4, 2, "fsdp", False, marks=pytest.mark.slow),  # and parameters kept gathered after forward
    pytest.param(2, 2, "allreduce", True, marks=pytest.mark.slow),
], ids=["ep2", "dp2", "dp2xep2", "ep2-allreduce"])
def test_ranks_train_like_one_process_and_save_a_checkpoint_one_process_loads(corpus, tmp_path, world, ep_size,
                                                                              dp_impl, reshard):
    """Weights to 1e-4 after 3 Adam steps of lr 3e-3: Adam turns the rounding noise of exactly-zero
    or tiny gradients (attention key biases, rare tokens' embeddings) into moves of up to ~2e-5
    (rounding differs: one process weights the activation before W2 in the fused backend, the
    ranks weight each expert's output after, on the token's rank); a real error moves weights
    by ~lr."""
    cfg = _config(corpus, tmp_path / "cache", grad_accum=1, dp_impl=dp_impl, reshard_after_forward=reshard)
    two = tmp_path / "two"
    workers.spawn(workers.run_training, world, to_dict(cfg), str(two), ep_size, PROBE)

    # One process, the same micro-batches per step: grad_accum = ranks.
    one = tmp_path / "one"
    train_lm(_config(corpus, tmp_path / "cache", grad_accum=world), one, progress=False)
    train_rows = lambda run, key: [r[key] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert len(train_rows(two, "loss")) == 3
    assert train_rows(two, "loss") == pytest.approx(train_rows(one, "loss"), rel=1e-5)
    # Adam hides a wrong gradient scale; the global gradient norm (averaging, and each expert
    # shard counted once) does not.
    assert train_rows(two, "grad_norm") == pytest.approx(train_rows(one, "grad_norm"), rel=1e-4)

    single, sharded = load_lm(one, device="cpu").model, load_lm(two, device="cpu").model
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: name + m)
    ranks = [torch.load(two / f"probe-rank{r}.pt", weights_only=False) for r in range(world)]
    _check_layout(ranks, single, dp_impl=dp_impl, dp_size=world // ep_size, ep_size=ep_size)

    # The final evaluation: each rank ran its share of the 3 batches (one padded), and the run
    # logged one process's evaluation of the trained model on all of them.
    assert [r["eval_forwards"] for r in ranks] == [math.ceil(3 / world)] * world
    logged = [r for r in read_metrics(two / "metrics.jsonl") if r["split"] == "val"][-1]
    whole = evaluate_lm(sharded, eval_batches(load_lm(two, device="cpu"), None, max_batches=3))
    assert whole.tokens == logged["tokens"] == 3 * 4 * 32
    assert logged["perplexity"] == pytest.approx(whole.perplexity, rel=1e-5)
    assert [layer["experts_per_token"] for layer in logged["layers"]] == pytest.approx(
        [layer["experts_per_token"] for layer in whole.to_dict()["layers"]], rel=1e-5)

    # Saved by 2 ranks, loaded by one: the same logits as the 2 ranks' sharded model.
    with torch.no_grad():
        logits = sharded(PROBE).logits_BLV
    for rank in range(world):
        torch.testing.assert_close(torch.load(two / f"probe-rank{rank}.pt")["logits"], logits, rtol=1e-5, atol=1e-5)


def _check_layout(ranks: list[dict], single: torch.nn.Module, *, dp_impl: str, dp_size: int, ep_size: int) -> None:
    """What each rank held while training, against the whole model of one process: under fsdp
    every parameter but the expert shards is a DTensor whose parts over the ranks add up to it
    once; expert shards (ep > 1) are plain, E / ep experts each, replicated dp times (so held
    dp times in all); under allreduce dense parameters are whole on every rank. Adam's moments
    follow their parameters."""
    whole = dict(single.named_parameters())
    for name, p in whole.items():
        expert = ep_size > 1 and ".experts." in name
        parts = [r["layout"][name] for r in ranks]
        assert all(part["dtensor"] == (dp_impl == "fsdp" and not expert) for part in parts), name
        copies = dp_size if expert else (1 if dp_impl == "fsdp" else len(ranks))
        assert sum(part["local_numel"] for part in parts) == p.numel() * copies, name
    held = sum(p.numel() * (dp_size if ep_size > 1 and ".experts." in name else 1 if dp_impl == "fsdp" else len(ranks))
               for name, p in whole.items())
    assert sum(r["adam_bytes"] for r in ranks) == 2 * 4 * held  # exp_avg and exp_avg_sq, fp32


def test_a_two_rank_run_resumes_in_one_process_with_the_same_micro_batches(corpus, tmp_path):
    """One process continues a 2-rank run from its sharded checkpoint, or from that checkpoint
    consolidated into a single file, with the same result; it must keep grad_accum x ranks, and
    says how when it does not."""
    cache = tmp_path / "cache"
    two = tmp_path / "two"
    workers.spawn(workers.run_training, WORLD, to_dict(_config(corpus, cache, grad_accum=1)), str(two), 2, PROBE)
    assert (two / "checkpoint" / "dcp" / ".metadata").is_file() and not (two / "checkpoint" / "model.safetensors").exists()
    consolidated = tmp_path / "consolidated"
    shutil.copytree(two, consolidated)
    consolidate_checkpoint(consolidated)
    assert sorted(p.name for p in (consolidated / "checkpoint").iterdir()) == sorted(
        ["model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.json", "manifest.json"])
    for (name, a), (_, b) in zip(load_lm(two, device="cpu").model.state_dict().items(),
                                 load_lm(consolidated, device="cpu").model.state_dict().items()):
        assert torch.equal(a, b), name

    damaged = tmp_path / "damaged"  # one flipped byte in one rank's shard file is refused, naming it
    shutil.copytree(two, damaged)
    shard = sorted((damaged / "checkpoint" / "dcp").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} does not match the checksum"):
        load_lm(damaged, device="cpu")
    swapped = tmp_path / "swapped"  # the two ranks' shard files swapped, the manifest made to fit
    shutil.copytree(two, swapped)
    first, second = sorted((swapped / "checkpoint" / "dcp").glob("*.distcp"))
    first.rename(swapped / "tmp"), second.rename(first), (swapped / "tmp").rename(second)
    recompute_manifest(swapped / "checkpoint")
    with pytest.raises(CheckpointError, match=r"__[01]_0\.distcp (is truncated|holds rank|does not hold what)"):
        load_lm(swapped, device="cpu")

    with pytest.raises(ValueError, match="train.grad_accum=2"):
        train_lm(_config(corpus, cache, grad_accum=1, max_steps=4), two, resume=True, progress=False)
    train_lm(_config(corpus, cache, grad_accum=2, max_steps=4), two, resume=True, progress=False)
    train_lm(_config(corpus, cache, grad_accum=2, max_steps=4), consolidated, resume=True, progress=False)
    for (name, a), (_, b) in zip(load_lm(two, device="cpu").model.state_dict().items(),
                                 load_lm(consolidated, device="cpu").model.state_dict().items()):
        assert torch.equal(a, b), name  # the optimizer state and RNG came through consolidation whole

    straight = tmp_path / "straight"  # the same schedule: 3 steps planned, then extended to 4
    train_lm(_config(corpus, cache, grad_accum=2), straight, progress=False)
    train_lm(_config(corpus, cache, grad_accum=2, max_steps=4), straight, resume=True, progress=False)
    resumed, reference = load_lm(two, device="cpu").model, load_lm(straight, device="cpu").model
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: name + m)


@pytest.mark.slow
def test_a_run_moves_from_one_process_to_four_ranks_to_two_and_back_to_one(corpus, tmp_path):
    """Each step on another number of ranks, resumed from the checkpoint of the step before: a
    single-file checkpoint split into FSDP and expert shards (1 -> 4), a sharded one split
    differently (4 -> 2) and read whole (2 -> 1). Micro-batches per step stay 4 (grad_accum x
    ranks), so the run must end where one process running all 4 steps ends."""
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    config = lambda ranks, steps: _config(corpus, cache, grad_accum=4 // ranks, max_steps=steps, schedule_steps=4)
    train_lm(config(1, 1), run, progress=False)
    workers.spawn(workers.run_training, 4, to_dict(config(4, 2)), str(run), 2, PROBE, True)  # dp2 x ep2
    assert read_state(checkpoint_dir(run))["step"] == 2 and (run / "checkpoint" / "dcp").is_dir()
    workers.spawn(workers.run_training, 2, to_dict(config(2, 3)), str(run), 2, PROBE, True)  # ep2
    train_lm(config(1, 4), run, resume=True, progress=False)

    straight = tmp_path / "straight"
    train_lm(config(1, 4), straight, progress=False)
    losses = lambda r: [row["loss"] for row in read_metrics(r / "metrics.jsonl") if row["split"] == "train"]
    assert losses(run) == pytest.approx(losses(straight), rel=1e-5)
    for (name, a), (_, b) in zip(load_lm(straight, device="cpu").model.state_dict().items(),
                                 load_lm(run, device="cpu").model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: name + m)


def test_checkpoint_of_a_sharded_model_rejects_an_ep_size_that_does_not_divide_the_experts(corpus, tmp_path):
    from xmoe.distributed import local_shard

    model = GPT(_config(corpus, tmp_path, grad_accum=1).model)
    layer = model.moe_layers()[0]
    with pytest.raises(ValueError, match="--ep-size"):
        local_shard(layer.experts, layer.cfg, ep_rank=0, ep_size=3)


def test_fsdp_mixed_precision_trains_in_bf16_and_keeps_fp32_gradients(tmp_path):
    """The GPU path (bf16 parameters in forward and backward, fp32 reduction), run on CPU gloo:
    losses within bf16 rounding of one fp32 process on each rank's tokens, fp32 gradients, and
    the routers' gates gathered in fp32 (a bf16 gate would move tokens between experts)."""
    tokens = torch.randint(200, (WORLD, 2, 16), generator=torch.Generator().manual_seed(0))
    workers.spawn(workers.run_mixed_precision, WORLD, tokens, str(tmp_path))
    torch.manual_seed(0)
    model = GPT(get_preset("debug-xmoe"))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["forward_dtype"] == torch.bfloat16 and got["dtypes"] == {torch.float32}
        assert got["router_dtype"] == torch.float32
        assert got["loss"] == pytest.approx(float(model(tokens[rank], tokens[rank]).loss), rel=2e-2)
        assert 0 < got["grad_norm"] < float("inf")
