"""Position vs token (ABBA/BABA, exchanged names, noise) on every family: the extra corruptions are built as the
params say, a source equal to the clean run changes nothing, and every head's effect equals
``transformer_lens.patching`` with the clean prompts as the base and the source's cache as the patch."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from transformer_lens import patching as tlp

from helpers.analyses import position_vs_token
from helpers.engine.metrics import logit_diff
from helpers.task.params import ParamsError, load_params
from helpers.task.prompts import make_prompts
from helpers.toys.families import FAMILIES

IOI = load_params("ioi")


def test_ioi_corruptions_are_built_from_the_same_words(toy_ioi, ioi_prompts):
    alts = ioi_prompts.alternatives
    assert set(alts) == {"flipped_order", "exchanged_names", "subject_noise"}
    words = ioi_prompts.slot_words[0]
    io, subject = words["S1"], words["S2"]
    assert alts["flipped_order"].prompts[0].startswith(f"When {subject} and {io} went")
    assert alts["flipped_order"].prompts[0].split(",")[1].split()[0] == subject
    assert alts["exchanged_names"].prompts[0].split(",")[1].split()[0] == io
    assert alts["flipped_order"].tokens.shape == ioi_prompts.clean_tokens.shape
    noise = alts["subject_noise"]
    assert torch.equal(noise.tokens, ioi_prompts.clean_tokens)
    assert noise.noise_positions == sorted([ioi_prompts.positions["S1"], ioi_prompts.positions["S2"]])
    assert noise.noise_mask.shape == ioi_prompts.clean_tokens.shape


def _with_corruptions(tmp_path, corruptions: dict, n_prompts: int = 8):
    raw = yaml.safe_load(IOI.source.read_text())
    raw.update(corruptions=corruptions, n_prompts=n_prompts)
    path = tmp_path / "ioi_extra.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def test_a_source_equal_to_the_clean_run_changes_nothing(toy_ioi, tmp_path):
    params = _with_corruptions(tmp_path, {"same": {"template": IOI.template}})
    prompts = make_prompts(params, toy_ioi.tokenizer, verbose=False)
    for position in position_vs_token.POSITIONS:
        result = position_vs_token.patch_from(toy_ioi, prompts, "same", position, progress=False)
        assert result.effect.abs().max() == 0
        assert result.logit_diff_source == pytest.approx(result.logit_diff_clean)


def test_noise_is_seeded_and_vanishes_with_its_scale(toy_ioi, tmp_path):
    params = _with_corruptions(tmp_path, {"loud": {"noise": ["S2"], "scale": 3.0}, "quiet": {"noise": ["S2"], "scale": 1e-6}})
    prompts = make_prompts(params, toy_ioi.tokenizer, verbose=False)
    quiet = position_vs_token.patch_from(toy_ioi, prompts, "quiet", "all", progress=False)
    assert quiet.effect.abs().max() < 1e-4
    loud = [position_vs_token.patch_from(toy_ioi, prompts, "loud", "end", seed=3, progress=False).effect for _ in range(2)]
    assert torch.equal(loud[0], loud[1]) and loud[0].abs().max() > 0.01
    assert not torch.equal(loud[0], position_vs_token.patch_from(toy_ioi, prompts, "loud", "end", seed=4, progress=False).effect)


@pytest.mark.parametrize("family", FAMILIES)
def test_effects_equal_transformer_lens_patching(family, family_models):
    model, prompts = family_models(family)
    end, cfg = prompts.n_pos - 1, model.cfg
    cells = torch.tensor([[0, end, 0], [cfg.n_layers - 1, end, cfg.n_heads - 1], [cfg.n_layers // 2, end, 1]])
    for name in ("exchanged_names", "subject_noise"):
        alt = prompts.alternatives[name]
        result = position_vs_token.patch_from(model, prompts, name, "end", progress=False)
        ctx = position_vs_token.source_context(model, prompts, alt)
        clean = logit_diff(model(prompts.clean_tokens), prompts.answer_tokens).mean()

        def metric(logits, clean=clean):
            return logit_diff(logits, prompts.answer_tokens).mean() / clean - 1

        expected = tlp.generic_activation_patch(
            model,
            prompts.clean_tokens,
            ctx.source_cache,
            metric,
            patch_setter=tlp.layer_pos_head_vector_patch_setter,
            activation_name="z",
            index_df=pd.DataFrame(cells.numpy()),
        )
        got = torch.stack([result.effect[l, h] for l, _, h in cells.tolist()])
        assert torch.allclose(got, expected.to(got), atol=1e-4), (name, got, expected)


def test_reads_as():
    changes = {"flip": "position", "swap": "token", "noise": "other"}
    assert position_vs_token.reads_as({"flip": -0.5, "swap": 0.1, "noise": 3}, changes) == "position"
    assert position_vs_token.reads_as({"flip": 0.02, "swap": -1.2, "noise": 0}, changes) == "token"
    assert position_vs_token.reads_as({"flip": 0.5, "swap": -0.4, "noise": 0}, changes) == "both"
    assert position_vs_token.reads_as({"flip": 0.05, "swap": 0.05, "noise": 2}, changes) == "neither"
    assert position_vs_token.reads_as({"noise": 2}, {"noise": "other"}) == "n/a"


@pytest.mark.parametrize(
    "corruption, message",
    [
        ({"template": IOI.template, "noise": ["S1"]}, "exactly one of 'template'"),
        ({"noise": ["S9"]}, "corruptions.bad.noise"),
        ({"template": "When [S1] and [S7] went"}, "corruptions.bad.template: slot [S7]"),
        ({"noise": ["S1"], "changes": "colour"}, "corruptions.bad.changes"),
    ],
)
def test_bad_corruptions_name_the_field(tmp_path, corruption, message):
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _with_corruptions(tmp_path, {"bad": corruption})


def test_a_corruption_of_another_length_is_refused_before_any_run(toy_ioi, tmp_path):
    params = _with_corruptions(tmp_path, {"short": {"template": "When [S2] and [S1] went, [S2] gave a [S4] to"}})
    with pytest.raises(ParamsError, match="corruptions.short.template"):
        make_prompts(params, toy_ioi.tokenizer, verbose=False)
