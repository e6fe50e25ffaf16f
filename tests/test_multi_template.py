"""Tasks that mix several sentence templates (IOI's ABBA and BABA): prompts split evenly, named positions per prompt,
mean ablation within each template, and per-template patching equal to patching each template's prompts alone."""

from __future__ import annotations

import pytest
import torch
import yaml

from helpers.analyses import circuits
from helpers.analyses import head_functions as HF
from helpers.engine.metrics import group_mean
from helpers.methods import importance, patching
from helpers.task.params import ParamsError, load_params
from helpers.task.prompts import PromptPair, make_prompts

MIXED = load_params("ioi_mixed", n_prompts=16)


@pytest.fixture(scope="module")
def mixed(toy_ioi):
    return make_prompts(MIXED, toy_ioi.tokenizer, verbose=False)


def test_prompts_split_evenly_with_positions_per_prompt(toy_ioi, mixed):
    assert mixed.template_names == ["ABBA-when", "BABA-when", "ABBA-after", "BABA-after"]
    assert mixed.templates.tolist() == [i % 4 for i in range(16)]
    assert set(mixed.positions) == {"S2", "end"} and set(mixed.varying_positions) == {"IO", "S1"}
    for b, words in enumerate(mixed.slot_words):
        tokens = [toy_ioi.tokenizer.decode([int(t)]) for t in mixed.clean_tokens[b]]
        assert tokens[int(mixed.position_index["IO"][b])] == " " + words["S1"]
        assert tokens[int(mixed.position_index["S1"][b])] == " " + words["S2"]
        assert tokens[mixed.positions["S2"]] == " " + words["S2"]
        first_word = tokens[1]
        assert first_word == ("When" if mixed.templates[b] < 2 else "After")
    assert mixed.position_labels[2] == "[S1]|[S2]"


def _write(tmp_path, **changes):
    raw = yaml.safe_load(MIXED.source.read_text())
    raw.pop("corruptions")  # they name the shipped templates; cases that test them give their own
    raw.update(changes)
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"template": "When [S1] and [S2] went"}, "not both"),
        (
            {
                "templates": [
                    {"name": "a", "template": "When [S1] and [S2] went to the [S3], [S2] gave a [S4] to"},
                    {"name": "a", "template": "When [S2] and [S1] went to the [S3], [S2] gave a [S4] to"},
                ]
            },
            "names must differ",
        ),
        (
            {"templates": [{"name": "a", "template": "When [S1] and [S2] went to the [S3], [S2] gave a [S4] to"}], "corruption": None},
            "no corrupted_template",
        ),
        ({"corruptions": {"flip": {"template": "When [S2] and [S1] went to the [S3], [S2] gave a [S4] to"}}}, "map each to its form"),
        (
            {"corruptions": {"flip": {"template": {"ABBA-when": "When [S2] and [S1] went to the [S3], [S2] gave a [S4] to"}}}},
            r"give a form for each template .* \(missing \['ABBA-after', 'BABA-after', 'BABA-when'\]",
        ),
        ({"templates": [{"name": "a", "template": "When [S1] and [S2] went to the [S3], [S2] gave a [S4] to", "colour": 1}]}, "colour"),
    ],
)
def test_bad_template_lists_name_the_field(tmp_path, changes, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_write(tmp_path, **changes))


def test_templates_of_another_length_are_refused_naming_them(toy_ioi, tmp_path):
    path = _write(
        tmp_path,
        templates=[
            {"name": "short", "template": "When [S1] and [S2] went, [S2] gave a [S4] to"},
            {"name": "long", "template": "When [S1] and [S2] went to the [S3], [S2] gave a [S4] to"},
        ],
    )
    with pytest.raises(ParamsError, match=r"templates \(long vs short\)"):
        make_prompts(load_params(path), toy_ioi.tokenizer, verbose=False)


def test_group_mean_is_each_groups_own_mean():
    x = torch.arange(12.0).reshape(6, 2)
    groups = torch.tensor([0, 1, 0, 1, 2, 2])
    out = group_mean(x, groups)
    for g in range(3):
        assert torch.equal(out[groups == g], x[groups == g].mean(0, keepdim=True).expand(int((groups == g).sum()), 2))
    assert group_mean(x, torch.zeros(6, dtype=torch.long)).shape == (1, 2)


def test_per_template_patching_equals_patching_each_template_alone(toy_ioi, mixed):
    ctx = patching.make_context(toy_ioi, mixed)
    grouped = patching.run_sweep(ctx, patching.SWEEPS["head_out"], groups=mixed.templates, progress=False)
    assert grouped.shape == (4, toy_ioi.cfg.n_layers, toy_ioi.cfg.n_heads)
    for t, mask in enumerate(mixed.template_masks().values()):
        alone = patching.make_context(
            toy_ioi, PromptPair.denoising(mixed.clean_tokens[mask], mixed.corrupted_tokens[mask], mixed.answer_tokens[mask])
        )
        assert torch.allclose(grouped[t], patching.sweep(alone, "head_out", progress=False), atol=1e-4)
    overall = patching.sweep(ctx, "head_out", progress=False)
    assert torch.allclose(patching.run_sweep(ctx, patching.SWEEPS["head_out"], progress=False), overall)


def test_word_positions_follow_each_prompt(toy_ioi, mixed):
    cache = HF.clean_cache(toy_ioi, mixed)
    pos = HF.word_positions(mixed)
    between = HF.attention_between(cache, toy_ioi.cfg.n_layers, {"end": mixed.n_pos - 1}, pos)  # [layer, head, from, word]
    pattern = torch.stack(
        [cache[f"blocks.{l}.attn.hook_pattern"][:, :, -1] for l in range(toy_ioi.cfg.n_layers)]
    )  # [layer, batch, head, k]
    expected = torch.stack([pattern[:, b, :, [int(pos[n][b]) for n in pos]] for b in range(pattern.shape[1])]).mean(0)
    assert torch.allclose(between[:, :, 0], expected, atol=1e-6)
    assert float(expected[..., :2].max()) > 0.3  # some head attends to IO or S1, so a wrong index would show
    ac = HF.attention_vs_contribution(toy_ioi, cache, mixed, pos)
    assert torch.allclose(ac.attention.mean(2), expected, atol=1e-6)


def test_mean_ablation_is_within_each_template(toy_ioi, mixed):
    z = circuits.reference_z(toy_ioi, mixed.corrupted_tokens, "mean", mixed.templates)
    plain = circuits.reference_z(toy_ioi, mixed.corrupted_tokens, "mean")
    assert z.shape[1] == len(mixed.clean_tokens) and plain.shape[1] == 1
    babas = mixed.template_masks()["BABA-when"]
    _, cache = toy_ioi.run_with_cache(mixed.corrupted_tokens[babas], names_filter=["blocks.1.attn.hook_z"])
    assert torch.allclose(z[1, babas], cache["blocks.1.attn.hook_z"].mean(0, keepdim=True).expand_as(z[1, babas]), atol=1e-5)
    result = importance.head_importance(
        toy_ioi, mixed.clean_tokens[:4], mixed.answer_tokens[:4], groups=mixed.templates[:4], progress=False
    )
    assert result.logit_diff.abs().max() < 1e-5  # one prompt per template: each is its own template's mean


def test_extra_corruptions_follow_each_template(toy_ioi, mixed):
    """Flipped order maps ABBA to BABA and back; subject noise marks each template's own subject positions."""
    flipped, noise = mixed.alternatives["flipped_order"], mixed.alternatives["subject_noise"]
    for b, words in enumerate(mixed.slot_words[:4]):
        first = mixed.clean_prompts[b].split()[1]
        assert flipped.prompts[b].split()[1] == (words["S2"] if first == words["S1"] else words["S1"])
        subject = {int(mixed.position_index["S1"][b]), mixed.positions["S2"]}
        assert set(noise.noise_mask[b].nonzero().flatten().tolist()) == subject
    with pytest.raises(ValueError, match="different positions"):
        _ = noise.noise_positions
    from helpers.analyses import position_vs_token

    result = position_vs_token.patch_from(toy_ioi, mixed, "exchanged_names", progress=False)
    assert float(result.effect[3, 2]) < -1  # the name mover copies the token in every template: exchanging names reverses it
