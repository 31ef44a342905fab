"""CogView2Scheduler: official defaults, style recipes, stage samplers, LoPAR passes, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coglm_hf.sampling import LOPAR_ORDER_MATRIX, cluster_sample, lopar_regeneration_mask, top_k_sample
from coglm_hf.scheduling_cogview2 import SAMPLER_KNOBS, CogView2Scheduler

OFFICIAL_DEFAULTS = {  # the official scripts' effective values
    "temperature": 1.15,
    "top_k_clusters": 16,
    "cluster_temperature": 1.0,
    "dsr_temperature": 1.0,
    "dsr_top_k_clusters": 100,
    "dsr_cluster_temperature": 0.89,
    "itersr_top_k": (40, 40, 40, 20, 20, 10),
    "itersr_temperature": 1.0,
}


def public_config(scheduler: CogView2Scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def official_labels(cogview2_fixture_dir: Path) -> np.ndarray:
    return np.load(cogview2_fixture_dir / "cluster_label.npy")


@pytest.fixture(scope="module")
def scheduler(official_labels) -> CogView2Scheduler:
    return CogView2Scheduler(cluster_labels=official_labels)


def test_official_cluster_table(scheduler, official_labels):
    assert official_labels.shape == (20000,) and official_labels.dtype == np.int64
    assert scheduler.config.num_clusters == 500
    assert scheduler.cluster_labels.dtype == torch.long and scheduler.cluster_labels.shape == (20000,)
    assert torch.equal(scheduler.cluster_labels, torch.from_numpy(official_labels))
    sizes = np.bincount(official_labels)
    assert len(sizes) == 500 and sizes.min() == 9 and sizes.max() == 133  # the official cluster table


def test_defaults_are_the_official_effective_values(scheduler):
    settings = scheduler.sampler_settings("mainbody")
    assert settings == OFFICIAL_DEFAULTS
    assert scheduler.config.lopar_order_matrix == [list(row) for row in LOPAR_ORDER_MATRIX]
    assert scheduler.num_lopar_passes == 6


def test_style_recipes():
    scheduler = CogView2Scheduler()
    expected_overrides = {
        "flat": {"temperature": 1.1, "dsr_top_k_clusters": 5, "dsr_cluster_temperature": 0.4},
        "comics": {"temperature": 1.1, "dsr_top_k_clusters": 5, "dsr_cluster_temperature": 0.4},
        "sketch": {"temperature": 1.1},
        "isometric": {"temperature": 1.1},
        "chinese": {"temperature": 1.12},
    }
    assert set(scheduler.styles) == {
        "none",
        "mainbody",
        "photo",
        "flat",
        "comics",
        "oil",
        "sketch",
        "isometric",
        "chinese",
        "watercolor",
    }
    for style in scheduler.styles:
        assert scheduler.sampler_settings(style) == {**OFFICIAL_DEFAULTS, **expected_overrides.get(style, {})}
    # the dead iterative-SR overrides of flat/comics are not applied
    assert scheduler.sampler_settings("flat")["itersr_top_k"] == (40, 40, 40, 20, 20, 10)


def test_sampler_settings_precedence_and_validation():
    scheduler = CogView2Scheduler(temperature=1.3, dsr_top_k_clusters=50)
    settings = scheduler.sampler_settings("none", top_k_clusters=1, cluster_temperature=0, dsr_temperature=None)
    assert settings["temperature"] == 1.3 and settings["dsr_top_k_clusters"] == 50  # config
    assert settings["top_k_clusters"] == 1 and settings["cluster_temperature"] == 0  # explicit
    assert settings["dsr_temperature"] == 1.0  # None ignored
    assert scheduler.sampler_settings("chinese")["temperature"] == 1.12  # style over config
    assert scheduler.sampler_settings("chinese", temperature=0.9)["temperature"] == 0.9  # explicit over style
    assert scheduler.sampler_settings(itersr_top_k=1)["itersr_top_k"] == (1,) * 6
    assert set(settings) == set(SAMPLER_KNOBS)
    with pytest.raises(ValueError, match="Unknown style 'anime'.*mainbody.*watercolor"):
        scheduler.sampler_settings("anime")
    with pytest.raises(ValueError, match="Unknown sampler setting.*top_k"):
        scheduler.sampler_settings("none", top_k=3)
    with pytest.raises(ValueError, match="one value per LoPAR pass"):
        scheduler.sampler_settings(itersr_top_k=[40, 20])
    with pytest.raises(ValueError, match="temperature"):
        scheduler.sampler_settings(temperature=0)
    with pytest.raises(ValueError, match="dsr_cluster_temperature"):
        scheduler.sampler_settings(dsr_cluster_temperature=-1)
    with pytest.raises(ValueError, match="top_k_clusters"):
        scheduler.sampler_settings(top_k_clusters=0)
    with pytest.raises(ValueError, match="itersr_top_k"):
        scheduler.sampler_settings(itersr_top_k=[40, 40, 40, 20, 20, 0])


def test_constructor_validation():
    with pytest.raises(ValueError, match="one value per LoPAR pass"):
        CogView2Scheduler(itersr_top_k=[40, 40])
    with pytest.raises(ValueError, match="temperature"):
        CogView2Scheduler(temperature=-1.0)
    with pytest.raises(ValueError, match="rectangular"):
        CogView2Scheduler(lopar_order_matrix=[[1, 2], [3]])
    with pytest.raises(ValueError, match="1-D integer"):
        CogView2Scheduler(cluster_labels=[[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="num_clusters"):
        CogView2Scheduler(cluster_labels=[0, 1, 2], num_clusters=2)
    # a custom 2×2 order matrix gives 2 passes
    small = CogView2Scheduler(lopar_order_matrix=[[0, 1], [2, 1]], itersr_top_k=[5, 3])
    passes = list(small.lopar_passes(3, 3))
    assert [(t, k) for t, _, k in passes] == [(1, 5), (2, 3)]
    assert passes[1][1].tolist() == [[False, False, False], [True, False, True], [False, False, False]]


def test_no_labels_is_a_clear_error():
    scheduler = CogView2Scheduler()
    with pytest.raises(ValueError, match="no cluster labels.*set_cluster_labels"):
        scheduler.sample_stage1(torch.randn(1, 10))
    scheduler.set_cluster_labels(np.arange(10) % 3)
    assert scheduler.config.num_clusters == 3 and scheduler.config.cluster_labels == (np.arange(10) % 3).tolist()
    assert scheduler.sample_stage1(torch.randn(2, 10)).shape == (2,)
    with pytest.raises(ValueError, match=">= 0"):
        scheduler.set_cluster_labels([0, -1, 2])
    with pytest.raises(TypeError, match="integers"):
        scheduler.set_cluster_labels(["a", "b"])


def test_stage_samplers_use_their_knobs(scheduler):
    labels = scheduler.cluster_labels
    logits = torch.randn(2, 30, 20000, generator=torch.Generator().manual_seed(0)) * 2

    def seeded():
        return torch.Generator().manual_seed(42)

    stage1 = scheduler.sample_stage1(logits[:, 0], generator=seeded())
    assert torch.equal(
        stage1,
        cluster_sample(
            logits[:, 0], labels, temperature=1.15, top_k_clusters=16, cluster_temperature=1.0, generator=seeded()
        ),
    )
    dsr = scheduler.sample_dsr(logits, generator=seeded())
    assert dsr.shape == (2, 30)
    assert torch.equal(
        dsr,
        cluster_sample(
            logits, labels, temperature=1.0, top_k_clusters=100, cluster_temperature=0.89, generator=seeded()
        ),
    )
    flat = scheduler.sampler_settings("flat")
    dsr_flat = scheduler.sample_dsr(
        logits,
        generator=seeded(),
        dsr_temperature=flat["dsr_temperature"],
        dsr_top_k_clusters=flat["dsr_top_k_clusters"],
        dsr_cluster_temperature=flat["dsr_cluster_temperature"],
    )
    assert torch.equal(
        dsr_flat,
        cluster_sample(logits, labels, temperature=1.0, top_k_clusters=5, cluster_temperature=0.4, generator=seeded()),
    )
    itersr = scheduler.sample_itersr(logits, top_k=20, generator=seeded())
    assert torch.equal(itersr, top_k_sample(logits, 20, temperature=1.0, generator=seeded()))
    assert torch.equal(scheduler.sample_itersr(logits, top_k=1), logits.argmax(-1))


def test_e2e_argmax_rules(scheduler, official_labels):
    """The deterministic rules of the official e2e run: cluster masses at 1.15 (stage 1) / 1.0 (DSR), the most
    massive cluster, then the raw-logit argmax inside it; the official setting (within-cluster temperature 1e-5)
    draws the same tokens for any seed."""
    logits = torch.randn(1, 60, 20000, generator=torch.Generator().manual_seed(1)) * 3
    for temperature, sample in ((1.15, scheduler.sample_stage1), (1.0, None)):
        if sample is None:
            got = scheduler.sample_dsr(logits, dsr_top_k_clusters=1, dsr_cluster_temperature=0)[0]
            official = scheduler.sample_dsr(
                logits, generator=torch.Generator().manual_seed(3), dsr_top_k_clusters=1, dsr_cluster_temperature=1e-5
            )[0]
        else:
            got = sample(logits[0], top_k_clusters=1, cluster_temperature=0)
            official = sample(
                logits[0], generator=torch.Generator().manual_seed(3), top_k_clusters=1, cluster_temperature=1e-5
            )
        assert torch.equal(got, official)
        checked = 0
        for j in range(60):
            z = logits[0, j].double().numpy()
            p = np.exp(z / temperature - (z / temperature).max())
            masses = np.bincount(official_labels, weights=p / p.sum(), minlength=500)
            ordered = np.sort(masses)
            if ordered[-1] - ordered[-2] < 1e-6:
                continue
            inside = np.flatnonzero(official_labels == masses.argmax())
            assert got[j].item() == inside[np.argmax(z[inside])]
            checked += 1
        assert checked >= 55


def test_lopar_passes(scheduler):
    passes = list(scheduler.lopar_passes(60, 60))
    assert [t for t, _, _ in passes] == [1, 2, 3, 4, 5, 6]
    assert [k for _, _, k in passes] == [40, 40, 40, 20, 20, 10]
    assert [int(m.sum()) for _, m, _ in passes] == [2300, 1900, 1500, 1000, 600, 200]
    for t, mask, _ in passes:
        assert torch.equal(mask, lopar_regeneration_mask(60, 60, t))
    edit = torch.zeros(1, 60, 60, dtype=torch.bool)
    edit[:, 10:30, 20:50] = True
    for t, mask, k in scheduler.lopar_passes(60, 60, input_mask=edit, itersr_top_k=1):
        assert k == 1 and mask.shape == (1, 60, 60)
        assert not (mask & ~edit).any()
        assert int(mask.sum()) == int(lopar_regeneration_mask(60, 60, t)[10:30, 20:50].sum())
    with pytest.raises(ValueError, match="one value per LoPAR pass"):
        next(scheduler.lopar_passes(60, 60, itersr_top_k=[1, 2]))


def test_save_load_round_trip(scheduler, tmp_path):
    custom = CogView2Scheduler(
        cluster_labels=scheduler.cluster_labels, temperature=1.05, itersr_top_k=[9, 8, 7, 6, 5, 4]
    )
    custom.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "CogView2Scheduler"
    assert isinstance(saved["cluster_labels"], list) and len(saved["cluster_labels"]) == 20000
    assert saved["itersr_top_k"] == [9, 8, 7, 6, 5, 4] and saved["num_clusters"] == 500

    loaded = CogView2Scheduler.from_pretrained(tmp_path)
    assert public_config(loaded) == public_config(custom)
    assert torch.equal(loaded.cluster_labels, custom.cluster_labels)
    assert loaded.sampler_settings("none") == custom.sampler_settings("none")
    logits = torch.randn(2, 50, 20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        loaded.sample_dsr(logits, generator=torch.Generator().manual_seed(1)),
        custom.sample_dsr(logits, generator=torch.Generator().manual_seed(1)),
    )
    from_config = CogView2Scheduler.from_config(loaded.config)
    assert public_config(from_config) == public_config(custom)
