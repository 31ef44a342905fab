"""Samplers and LoPAR schedule of `coglm_hf.sampling`, checked against the official sampling rules."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from coglm_hf.sampling import (
    LOPAR_NUM_PASSES,
    LOPAR_ORDER_MATRIX,
    LOPAR_TOP_K,
    ClusterSamplingLogitsProcessor,
    cluster_sample,
    lopar_num_passes,
    lopar_order,
    lopar_regeneration_mask,
    top_k_sample,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "coglm_hf"


# --------------------------------------------------------------------------------------------------- helpers


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; p-value from the regularised upper incomplete gamma function."""
    keep = probs > 0
    n = counts.sum()
    expected = n * probs[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def expected_cluster_distribution(z: np.ndarray, labels: np.ndarray, t: float, k: int, t2: float) -> np.ndarray:
    """Token distribution of the official cluster sampler for one row of logits, in float64 (independent of the implementation)."""
    num_clusters = labels.max() + 1
    masses = np.bincount(labels, weights=softmax64(z / t), minlength=num_clusters)
    top = np.argsort(-masses)[:k]
    dist = np.zeros_like(z, dtype=np.float64)
    for c in top:
        inside = labels == c
        dist[inside] = masses[c] / masses[top].sum() * softmax64(z[inside] / t / t2)
    return dist


def argmax_rule(z: np.ndarray, labels: np.ndarray, t: float) -> tuple[int, float]:
    """Deterministic rule of the official e2e run: most massive cluster, then argmax of the raw logits inside it.
    Returns (token, cluster-mass margin)."""
    masses = np.bincount(labels, weights=softmax64(z.astype(np.float64) / t))
    best, second = np.sort(masses)[-2:][::-1]
    cluster = int(masses.argmax())
    inside = np.flatnonzero(labels == cluster)
    return int(inside[np.argmax(z[inside])]), float(best - second)


@pytest.fixture(scope="module")
def small_labels() -> torch.Tensor:
    # 24 tokens in 6 clusters of sizes 1, 2, 3, 4, 6, 8, scattered over the ids.
    sizes = [1, 2, 3, 4, 6, 8]
    labels = np.repeat(np.arange(6), sizes)
    return torch.from_numpy(np.random.default_rng(0).permutation(labels))


@pytest.fixture(scope="module")
def official_labels(cogview2_fixture_dir: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(cogview2_fixture_dir / "cluster_label.npy"))


# ------------------------------------------------------------------------------------------------ LoPAR schedule


def test_order_matrix_matches_reference_histogram():
    values, counts = torch.tensor(LOPAR_ORDER_MATRIX).unique(return_counts=True)
    # LoPAR: value histogram per 6×6 block.
    assert dict(zip(values.tolist(), counts.tolist())) == {-2: 4, -1: 6, 0: 3, 1: 4, 2: 4, 3: 5, 4: 4, 5: 4, 6: 2}
    assert lopar_num_passes() == LOPAR_NUM_PASSES == len(LOPAR_TOP_K) == 6
    assert LOPAR_TOP_K == (40, 40, 40, 20, 20, 10)


@pytest.mark.parametrize("rows,cols", [(60, 60), (10, 7), (5, 13), (1, 1)])
def test_lopar_order_tiles_and_crops(rows, cols):
    order = lopar_order(rows, cols)
    assert order.shape == (rows, cols) and order.dtype == torch.long
    expected = [[LOPAR_ORDER_MATRIX[r % 6][c % 6] for c in range(cols)] for r in range(rows)]
    assert order.tolist() == expected


def test_lopar_pass_counts_on_60x60():
    counts = [int(lopar_regeneration_mask(60, 60, t).sum()) for t in range(1, 7)]
    assert counts == [2300, 1900, 1500, 1000, 600, 200]
    never = ~lopar_regeneration_mask(60, 60, 1)
    # 13 of every 36 cells are never re-masked: exactly the cells with M <= 0, in every 6×6 block.
    blocks = never.view(10, 6, 10, 6).sum(dim=(1, 3))
    assert (blocks == 13).all()
    assert torch.equal(never, lopar_order(60, 60) <= 0)
    for t in range(1, 6):  # nested: a cell regenerated in pass t+1 was regenerated in pass t
        later, earlier = lopar_regeneration_mask(60, 60, t + 1), lopar_regeneration_mask(60, 60, t)
        assert not (later & ~earlier).any()


def test_lopar_input_mask_restricts_cells():
    gen = torch.Generator().manual_seed(3)
    input_mask = torch.rand(2, 60, 60, generator=gen) < 0.3
    for t in range(1, 7):
        mask = lopar_regeneration_mask(60, 60, t, input_mask=input_mask)
        assert mask.shape == (2, 60, 60)
        assert torch.equal(mask, lopar_regeneration_mask(60, 60, t).unsqueeze(0) & input_mask)
        assert not (mask & ~input_mask).any()


def test_lopar_bad_inputs():
    with pytest.raises(ValueError, match="pass_index"):
        lopar_regeneration_mask(60, 60, 0)
    with pytest.raises(ValueError, match="pass_index"):
        lopar_regeneration_mask(60, 60, 7)
    with pytest.raises(ValueError, match="input_mask must have shape"):
        lopar_regeneration_mask(60, 60, 1, input_mask=torch.ones(3600, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        lopar_regeneration_mask(60, 60, 1, input_mask=torch.ones(60, 60))
    with pytest.raises(ValueError, match="grid_rows"):
        lopar_order(0, 60)
    with pytest.raises(ValueError, match="rectangular"):
        lopar_order(6, 6, order_matrix=[[1, 2], [3]])
    with pytest.raises(ValueError, match=">= 1"):
        lopar_order(6, 6, order_matrix=[[0, -1]])


def test_lopar_schedule_matches_official_e2e_run(cogview2_fixture_dir: Path):
    """In the official deterministic run, pass t changed only cells of our pass-t mask, as many as it reported."""
    tensors = load_file(cogview2_fixture_dir / "cases" / "e2e_L20.safetensors")
    case = next(c for c in json.loads((cogview2_fixture_dir / "cases.json").read_text())["cases"] if c["kind"] == "e2e")
    assert case["rules"]["lopar_matrix"] == [list(row) for row in LOPAR_ORDER_MATRIX]
    previous = tensors["dsr_tokens"][0].view(60, 60)
    changed_per_pass = []
    for t in range(1, 7):
        current = tensors["itersr_tokens"][t - 1, 0].view(60, 60)
        changed = current != previous
        assert not (changed & ~lopar_regeneration_mask(60, 60, t)).any(), f"pass {t} changed a cell outside its mask"
        changed_per_pass.append(int(changed.sum()))
        previous = current
    assert changed_per_pass == case["observed"]["cells_changed_per_pass"]
    assert changed_per_pass[0] == int(lopar_regeneration_mask(60, 60, 1).sum()) == 2300


# ------------------------------------------------------------------------------------------- cluster sampling


def test_cluster_sampling_statistics(small_labels):
    """Vectorised draws over many rows (two different logit rows interleaved) follow the official cluster sampler exactly."""
    temperature, k, cluster_temperature, n = 1.3, 3, 0.7, 30000
    rows = torch.tensor(np.random.default_rng(1).normal(0.0, 1.5, size=(2, 24)), dtype=torch.float32)
    logits = rows.repeat(n, 1).view(n, 2, 24)  # [n, 2, V]: row type alternates along dim 1
    gen = torch.Generator().manual_seed(1234)
    tokens = cluster_sample(
        logits,
        small_labels,
        temperature=temperature,
        top_k_clusters=k,
        cluster_temperature=cluster_temperature,
        generator=gen,
    )
    assert tokens.shape == (n, 2) and tokens.dtype == torch.long
    labels = small_labels.numpy()
    for r in range(2):
        z = rows[r].double().numpy()
        expected = expected_cluster_distribution(z, labels, temperature, k, cluster_temperature)
        counts = np.bincount(tokens[:, r].numpy(), minlength=24)
        # only tokens of the top-k clusters are ever drawn
        assert counts[expected == 0].sum() == 0
        assert len(np.unique(labels[counts > 0])) == k
        assert chi_square_p_value(counts, expected) > 1e-3
        # cluster frequencies ∝ P_c among the top-k
        cluster_counts = np.bincount(labels[tokens[:, r].numpy()], minlength=6)
        expected_clusters = np.bincount(labels, weights=expected, minlength=6)
        assert chi_square_p_value(cluster_counts, expected_clusters) > 1e-3
        # the test has power: the untempered within-cluster distribution (T2 = 1) is rejected
        wrong = expected_cluster_distribution(z, labels, temperature, k, 1.0)
        assert chi_square_p_value(counts, wrong) < 1e-6


def test_cluster_sampling_top1_cluster_still_samples_inside(small_labels):
    row = torch.tensor(np.random.default_rng(2).normal(0.0, 1.0, size=24), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tokens = cluster_sample(
        row.expand(20000, 24), small_labels, top_k_clusters=1, cluster_temperature=1.0, generator=gen
    )
    labels = small_labels.numpy()
    expected = expected_cluster_distribution(row.double().numpy(), labels, 1.0, 1, 1.0)
    counts = np.bincount(tokens.numpy(), minlength=24)
    assert len(np.unique(labels[counts > 0])) == 1 and (counts > 0).sum() > 1
    assert chi_square_p_value(counts, expected) > 1e-3


def test_cluster_argmax_mode_is_exact(official_labels):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 40, 20000, generator=gen) * 3
    for temperature in (1.15, 1.0):
        got = cluster_sample(logits, official_labels, temperature=temperature, top_k_clusters=1, cluster_temperature=0)
        assert got.shape == (2, 40)
        labels = official_labels.numpy()
        checked = not_global_argmax = 0
        for b in range(2):
            for j in range(40):
                z = logits[b, j].numpy()
                token, margin = argmax_rule(z, labels, temperature)
                if margin < 1e-6:  # fp32 vs fp64 masses may disagree on a near-tie
                    continue
                assert got[b, j].item() == token
                checked += 1
                not_global_argmax += token != int(z.argmax())
        assert checked >= 75
        assert not_global_argmax > 0  # the cluster rule really differs from a plain argmax on these logits


def test_cluster_sampling_seeded_determinism(official_labels):
    logits = torch.randn(3, 200, 20000, generator=torch.Generator().manual_seed(0))

    def draw(seed):
        return cluster_sample(
            logits, official_labels, temperature=1.15, top_k_clusters=16, generator=torch.Generator().manual_seed(seed)
        )

    first = draw(7)
    assert torch.equal(first, draw(7))
    assert (first != draw(8)).float().mean() > 0.5


def test_batched_equals_per_row_loop(official_labels):
    logits = torch.randn(2, 6, 20000, generator=torch.Generator().manual_seed(11)) * 2
    batched = cluster_sample(logits, official_labels, temperature=1.0, top_k_clusters=1, cluster_temperature=0)
    loop = torch.stack(
        [
            torch.stack(
                [
                    cluster_sample(
                        logits[b, j], official_labels, temperature=1.0, top_k_clusters=1, cluster_temperature=0
                    )
                    for j in range(6)
                ]
            )
            for b in range(2)
        ]
    )
    assert torch.equal(batched, loop)


def test_tiny_cluster_temperature_equals_argmax(official_labels):
    """The official e2e settings (top-k 1, within-cluster temperature 1e-5) draw the argmax-mode token."""
    logits = torch.randn(300, 20000, generator=torch.Generator().manual_seed(9)) * 3
    exact = cluster_sample(logits, official_labels, temperature=1.15, top_k_clusters=1, cluster_temperature=0)
    for seed in (0, 1):
        drawn = cluster_sample(
            logits,
            official_labels,
            temperature=1.15,
            top_k_clusters=1,
            cluster_temperature=1e-5,
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(drawn, exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(official_labels, dtype):
    logits = (torch.randn(4, 50, 20000, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    exact = cluster_sample(logits, official_labels, top_k_clusters=1, cluster_temperature=0)
    assert torch.equal(exact, cluster_sample(logits.float(), official_labels, top_k_clusters=1, cluster_temperature=0))
    drawn = cluster_sample(
        logits, official_labels, temperature=1.15, top_k_clusters=16, generator=torch.Generator().manual_seed(0)
    )
    assert drawn.dtype == torch.long and drawn.min() >= 0 and drawn.max() < 20000
    top = top_k_sample(logits, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_k_sample(logits, 1), logits.float().argmax(-1))
    assert (logits.float().gather(-1, top.unsqueeze(-1)) >= logits.float().topk(40).values[..., -1:]).all()


def test_extra_logit_columns_are_never_drawn(small_labels):
    logits = torch.randn(500, 24, generator=torch.Generator().manual_seed(4))
    full = torch.cat([logits, torch.full((500, 6), 50.0)], dim=-1)  # e.g. text ids of a full-vocabulary head
    a = cluster_sample(full, small_labels, top_k_clusters=4, generator=torch.Generator().manual_seed(1))
    b = cluster_sample(logits, small_labels, top_k_clusters=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.max() < 24


def test_top_k_clusters_larger_than_cluster_count(small_labels):
    row = torch.randn(24, generator=torch.Generator().manual_seed(6))
    tokens = cluster_sample(
        row.expand(20000, 24), small_labels, top_k_clusters=100, generator=torch.Generator().manual_seed(0)
    )
    expected = expected_cluster_distribution(row.double().numpy(), small_labels.numpy(), 1.0, 6, 1.0)
    assert chi_square_p_value(np.bincount(tokens.numpy(), minlength=24), expected) > 1e-3


def test_cluster_sample_bad_inputs(small_labels):
    logits = torch.randn(2, 24)
    with pytest.raises(ValueError, match="covers 24 image tokens"):
        cluster_sample(logits[:, :20], small_labels)
    with pytest.raises(ValueError, match="1-D integer"):
        cluster_sample(logits, small_labels.view(4, 6))
    with pytest.raises(ValueError, match="1-D integer"):
        cluster_sample(logits, small_labels.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        cluster_sample(logits, small_labels.tolist())
    with pytest.raises(ValueError, match=">= 0"):
        cluster_sample(logits, small_labels - 1)
    with pytest.raises(ValueError, match="num_clusters"):
        cluster_sample(logits, small_labels, num_clusters=3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_k_clusters"):
            cluster_sample(logits, small_labels, top_k_clusters=bad)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            cluster_sample(logits, small_labels, temperature=bad)
    with pytest.raises(ValueError, match="cluster_temperature"):
        cluster_sample(logits, small_labels, cluster_temperature=-0.5)
    with pytest.raises(TypeError, match="floating point"):
        cluster_sample(logits.long(), small_labels)
    with pytest.raises(ValueError, match="same device"):
        cluster_sample(logits.to("meta"), small_labels, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        cluster_sample(logits, small_labels, generator=0)


# --------------------------------------------------------------------------------------------- top-k sampling


def test_top_k_sampling_statistics():
    row = torch.tensor(np.random.default_rng(8).normal(0.0, 1.0, size=30), dtype=torch.float32)
    tokens = top_k_sample(
        row.expand(2, 20000, 30), top_k=5, temperature=0.8, generator=torch.Generator().manual_seed(0)
    )
    assert tokens.shape == (2, 20000)
    top = torch.topk(row, 5).indices.numpy()
    expected = np.zeros(30)
    expected[top] = softmax64(row.double().numpy()[top] / 0.8)
    counts = np.bincount(tokens.flatten().numpy(), minlength=30)
    assert set(np.flatnonzero(counts)) <= set(top.tolist())
    assert chi_square_p_value(counts, expected) > 1e-3
    wrong = np.zeros(30)
    wrong[top] = softmax64(row.double().numpy()[top])  # temperature ignored
    assert chi_square_p_value(counts, wrong) < 1e-6


def test_top_k_keeps_ties_with_the_kth_value():
    row = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 0.0, -1.0, 3.0])
    tokens = top_k_sample(row.expand(30000, 8), top_k=3, generator=torch.Generator().manual_seed(0))
    kept = [0, 1, 2, 3, 4, 7]  # the top 3 plus every value tied with the 3rd, as the official threshold rule
    expected = np.zeros(8)
    expected[kept] = softmax64(row.double().numpy()[kept])
    counts = np.bincount(tokens.numpy(), minlength=8)
    assert set(np.flatnonzero(counts)) == set(kept)
    assert chi_square_p_value(counts, expected) > 1e-3


def test_top_k_argmax_modes_and_determinism():
    logits = torch.randn(3, 100, 50, generator=torch.Generator().manual_seed(1))
    argmax = logits.argmax(-1)
    assert torch.equal(top_k_sample(logits, 1), argmax)
    assert torch.equal(top_k_sample(logits, 40, temperature=0), argmax)
    a = top_k_sample(logits, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, top_k_sample(logits, 10, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, top_k_sample(logits, 10, generator=torch.Generator().manual_seed(4)))
    assert top_k_sample(logits, 500, generator=torch.Generator().manual_seed(0)).max() < 50  # k clipped to V
    with pytest.raises(ValueError, match="top_k"):
        top_k_sample(logits, 0)
    with pytest.raises(ValueError, match="temperature"):
        top_k_sample(logits, 5, temperature=-1.0)


# ------------------------------------------------------------------------------------- transformers processor


def test_logits_processor_masks_to_one_drawn_cluster(small_labels):
    scores = torch.randn(64, 30, generator=torch.Generator().manual_seed(0))  # 24 image ids + 6 other ids
    proc = ClusterSamplingLogitsProcessor(
        small_labels,
        temperature=1.2,
        top_k_clusters=2,
        cluster_temperature=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    out = proc(torch.zeros(64, 1, dtype=torch.long), scores)
    assert out.dtype == torch.float32 and out.shape == scores.shape
    finite = torch.isfinite(out)
    assert not finite[:, 24:].any()
    labels = small_labels.numpy()
    for r in range(64):
        ids = np.flatnonzero(finite[r, :24].numpy())
        cluster = labels[ids[0]]
        assert (labels[ids] == cluster).all() and len(ids) == (labels == cluster).sum()
        masses = np.bincount(labels, weights=softmax64(scores[r, :24].double().numpy() / 1.2))
        assert cluster in np.argsort(-masses)[:2]
        torch.testing.assert_close(out[r, ids], scores[r, ids] / 1.2 / 0.5)


def test_logits_processor_with_generate(small_labels):
    from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=29, eos_token_id=29, pad_token_id=29
    )
    model = GPT2LMHeadModel(config).eval()
    prompt = torch.tensor([[25, 26, 27], [28, 25, 24]])
    labels = small_labels.numpy()

    # argmax mode: every generated token follows the deterministic cluster rule on that step's logits
    proc = ClusterSamplingLogitsProcessor(small_labels, temperature=1.15, top_k_clusters=1, cluster_temperature=0)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        logits_processor=LogitsProcessorList([proc]),
        do_sample=False,
        max_new_tokens=8,
    )
    with torch.no_grad():
        logits = model(out).logits
    for b in range(2):
        for p in range(3, out.shape[1]):
            assert out[b, p].item() == argmax_rule(logits[b, p - 1].numpy()[:24], labels, 1.15)[0]

    # sampling mode: tokens are image ids from the top-k clusters of their step
    proc = ClusterSamplingLogitsProcessor(small_labels, top_k_clusters=2, generator=torch.Generator().manual_seed(0))
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        logits_processor=LogitsProcessorList([proc]),
        do_sample=True,
        top_k=0,
        max_new_tokens=8,
    )
    with torch.no_grad():
        logits = model(out).logits
    assert out[:, 3:].max() < 24
    for b in range(2):
        for p in range(3, out.shape[1]):
            masses = np.bincount(labels, weights=softmax64(logits[b, p - 1, :24].double().numpy()))
            assert labels[out[b, p].item()] in np.argsort(-masses)[:2]


# ------------------------------------------------------------------------------------------------ remote code


@pytest.mark.parametrize(
    "name,allowed",
    [
        ("sampling.py", {"torch", "transformers"}),
        ("scheduling_cogview2.py", {"torch", "diffusers"}),
    ],
)
def test_remote_code_imports(name, allowed):
    tree = ast.parse((SRC / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the flat remote-code folder
                assert node.module is not None and "." not in node.module
                continue
            roots = {node.module.split(".")[0]}
        else:
            continue
        assert roots <= allowed | set(sys.stdlib_module_names), f"{name} imports {roots}"


@pytest.mark.gpu
def test_cuda_generator_and_device_checks(official_labels):
    logits = torch.randn(2, 100, 20000, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    drawn = cluster_sample(logits, official_labels, temperature=1.15, generator=gen)
    assert drawn.device.type == "cuda"
    again = cluster_sample(logits, official_labels, temperature=1.15, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(drawn, again)
    exact = cluster_sample(logits, official_labels, top_k_clusters=1, cluster_temperature=0)
    assert torch.equal(
        exact.cpu(), cluster_sample(logits.cpu(), official_labels, top_k_clusters=1, cluster_temperature=0)
    )
    assert torch.equal(top_k_sample(logits.half(), 1).cpu(), logits.half().float().argmax(-1).cpu())
    with pytest.raises(ValueError, match="same device"):
        cluster_sample(logits, official_labels, generator=torch.Generator().manual_seed(0))
