"""Study plans: which runs, with which configs, at the CPU, GPT-2 and debug scales; bad input."""

from __future__ import annotations

import json

import pytest

from xmoe.cli.main import main
from xmoe.models.gpt import GPT
from xmoe.study import plan_study

MAIN_LABELS = ["dense", "switch-8x512", "topk-16x256", "topk-64x64", "xmoe-16x256-t0.9", "xmoe-32x128-t0.9",
               "xmoe-64x64-t0.9"]


def test_cpu_plan_runs_each_model_once_and_seed_by_seed():
    plan = plan_study("all", scale="cpu")
    names = [r.name for r in plan.runs]
    assert len(names) == len(set(names)) == 7 * 3 + 3 + 1  # main x 3 seeds, t = 0.5/0.7/1.0, 8 experts
    assert names[:7] == [f"{label}-s0" for label in MAIN_LABELS]
    main_seeds = [r.seed for r in plan.runs[:21]]
    assert main_seeds == sorted(main_seeds)  # the main comparison first, seed by seed
    assert [r.name for r in plan.runs[21:]] == ["xmoe-64x64-t0.5-s0", "xmoe-64x64-t0.7-s0", "xmoe-64x64-t1-s0",
                                                "xmoe-8x512-t0.9-s0"]
    assert {r.name for r in plan.runs if r.label.startswith("xmoe-64x64-t")} >= {
        "xmoe-64x64-t0.5-s0", "xmoe-64x64-t0.7-s0", "xmoe-64x64-t0.9-s0", "xmoe-64x64-t1-s0"}


def test_cpu_family_is_parameter_matched_and_shares_one_recipe():
    plan = plan_study("all", scale="cpu")
    cfgs = {r.name: r.config() for r in plan.runs if r.seed == 0}
    trains = {json.dumps({k: v for k, v in vars(c.train).items() if k != "seed"}) for c in cfgs.values()}
    assert len(trains) == 1  # the same recipe for every run
    moe = {n: c.model.moe for n, c in cfgs.items() if c.model.moe is not None}
    assert {m.num_experts * m.expert_dim for m in moe.values()} == {8 * 512}
    # Counted on the built models (not with the config formula): within 1% of each other.
    params = {n: sum(p.numel() for p in GPT(cfgs[n].model).parameters()) for n in ("switch-8x512-s0", "xmoe-64x64-t0.9-s0")}
    assert abs(params["switch-8x512-s0"] / params["xmoe-64x64-t0.9-s0"] - 1) < 0.01
    budget = {n: m.top_k * m.expert_dim for n, m in moe.items()}
    assert set(budget.values()) == {512}  # top-k (and XMoE's budget) = one dense FFN of width 512
    assert cfgs["xmoe-8x512-t0.9-s0"].model.moe.router == "threshold"


def test_gpt2_scale_builds_the_papers_configs():
    plan = plan_study("all", scale="gpt2")
    cfg = {r.name: r.config() for r in plan.runs}
    assert cfg["dense-s0"].preset == "gpt2-dense" and cfg["topk-64x384-s2"].preset == "gpt2-topk-64x384"
    for c in cfg.values():
        m, t = c.model, c.train
        assert (m.n_layer, m.d_model, m.n_head, m.d_ff, m.block_size) == (12, 768, 12, 3072, 1024)
        assert t.batch_size * t.grad_accum == 256 and t.seq_len == 1024 and t.max_steps == 60_000
        assert t.lr == 4.5e-4 and t.lr * t.min_lr_ratio == pytest.approx(4.5e-6) and t.warmup_fraction == 0.1
        assert (t.betas, t.weight_decay, t.grad_clip, t.aux_loss_coef) == ((0.9, 0.95), 0.1, 1.0, 0.01)
        if m.moe is not None:
            assert m.moe.num_experts * m.moe.expert_dim == 8 * 3072
            assert (m.moe.capacity_factor, m.moe.min_capacity, m.moe_every) == (8.0, 4, 2)
    widths = {c.model.moe.expert_dim for n, c in cfg.items() if n.startswith("xmoe") and "t0.9" in n}
    assert widths == {3072, 1536, 768, 384}  # the granularity sweep: F, F/2, F/4, F/8
    switch = cfg["switch-8x3072-s0"].model
    # GPT-2 small with 6 MoE layers of 8 x 3072 and GPT-2's vocabulary, counted by hand: ~323M (paper).
    d, f, v = 768, 3072, 50257
    attn_ln = 12 * (4 * d * d + 4 * d + 4 * d)
    dense_ffn = 6 * (2 * d * f + f + d)
    moe = 6 * (8 * (2 * d * f + f + d) + 8 * d)
    by_hand = v * d + 1024 * d + 2 * d + attn_ln + dense_ffn + moe
    assert by_hand == pytest.approx(323e6, rel=0.01)
    from xmoe.models.gpt import num_params

    assert num_params(switch) == by_hand


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "mian"}, "unknown study 'mian'; choose one of main, threshold, granularity, all"),
    ({"name": "main", "scale": "gpt3"}, "unknown scale 'gpt3'"),
    ({"name": "main", "seeds": 0}, "seeds must be a positive integer"),
    ({"name": "main", "steps": 0}, "steps must be a positive integer"),
    ({"name": "main", "overrides": {"train.max_step": "3"}}, "did you mean 'train.max_steps'"),
])
def test_bad_plans_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_study(**kwargs)


def test_cli_plan_prints_the_runs(capsys):
    main(["study", "all", "--scale", "gpt2", "--plan"])
    out = json.loads(capsys.readouterr().out)
    assert out["out"] == "runs/study/gpt2-default" and len(out["runs"]) == 25
    assert out["runs"]["xmoe-8x3072-t0.9-s0"]["overrides"]["model.moe.num_experts"] == "8"


@pytest.mark.parametrize("argv, message", [
    (["study", "main", "--data", "/no/such/corpus.txt"], "--data /no/such/corpus.txt: no such file or folder"),
    (["study", "main", "--seeds", "0", "--plan"], "seeds must be a positive integer"),
    (["study", "main", "--plan", "--train.lr=fast"], "config key 'train.lr': expected float, got fast"),
    (["study", "main", "--plan", "--threads", "0"], "--threads must be a positive integer"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_rejects_unknown_study_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "everything"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'everything'" in capsys.readouterr().err
