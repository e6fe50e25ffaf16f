"""Mutation checks: break the code a test guards, run that test, expect it to fail; the code is restored after each.

``make mutation-check`` (``python tests/mutations.py [NAME-SUBSTRING]``) prints one row per mutation: "caught" when the
test failed on the broken code. A mutation whose text no longer occurs in its file is reported as "stale" (the code
moved on: update the mutation). Not collected by pytest; a few minutes (the figure mutation runs a notebook).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (what breaks, file, text, replacement, the test that must fail)
MUTATIONS = [
    (
        "edge circuits run where the start from block 0 is not the model's own output (BLOOM)",
        "helpers/methods/edges.py",
        "    if not start_exact(model, 0):",
        "    if False:",
        "tests/test_other_families.py::test_edge_circuits_and_direct_edges_refuse_a_start_that_is_not_exact",
    ),
    (
        "weight-based head analyses read a pre-norm that OLMo-2 does not have as the identity without checking",
        "helpers/engine/norms.py",
        "        verdicts[layer] = names[1] in cache and torch.equal(cache[names[0]], cache[names[1]])",
        "        verdicts[layer] = False",
        "tests/test_head_functions.py::test_ov_outputs_equal_a_head_attending_to_one_position",
    ),
    (
        "an unfolded final norm weight is left in place (OLMo-2)",
        "helpers/task/models.py",
        "    fold_final_norm(model)\n",
        "",
        "tests/test_other_families.py::test_an_unfolded_final_norm_is_folded_and_dla_adds_up",
    ),
    (
        "direct-edge path patching builds sender writes from heads that do not add up (Granite)",
        "helpers/methods/path_patching.py",
        "    if not heads_add_up(model):",
        "    if False:",
        "tests/test_other_families.py::test_heads_that_do_not_add_up_refuse_direct_edges",
    ),
    (
        "edge circuits are built where their identities fail (Granite, OLMo-2)",
        "helpers/methods/edges.py",
        "            if failed\n",
        "            if False\n",
        "tests/test_other_families.py::test_edge_circuits_whose_identities_fail_are_refused",
    ),
    (
        "a patched run starts from a block the bridge does not run exactly (BLOOM)",
        "helpers/engine/forward.py",
        "or not start_exact(model, layer):",
        ":",
        "tests/test_other_families.py::test_a_start_that_drops_the_models_own_computation_runs_from_the_tokens",
    ),
    (
        "knockouts share a run that ends at a block the bridge does not start from exactly",
        "helpers/analyses/circuits.py",
        "        if first > 0 and not start_exact(model, first):",
        "        if False:",
        "tests/test_other_families.py::test_its_knockouts_run_from_the_tokens",
    ),
    (
        "a DLA identity error no known caveat explains goes unsaid",
        "helpers/analyses/dla.py",
        "    if not caveats and error > IDENTITY_TOLERANCE",
        "    if False and error > IDENTITY_TOLERANCE",
        "tests/test_other_families.py::test_dla_that_does_not_add_up_says_so",
    ),
    (
        "neurons of a mixture of experts are not refused",
        "helpers/analyses/neurons.py",
        "    check_dense_mlp(model)\n",
        "",
        "tests/test_other_families.py::test_neurons_of_a_mixture_of_experts_are_refused",
    ),
    (
        "a start check settles the skip of the earlier blocks without comparing",
        "helpers/engine/forward.py",
        "        if same_output(out, expected):",
        "        if True:",
        "tests/test_interventions.py::test_a_start_checked_against_the_models_output_settles_the_skip_only_when_it_matches",
    ),
    (
        "a start check runs the plain checks besides the one run that settles them",
        "helpers/engine/forward.py",
        "        out = _fast_from_layer(model, resid, layer, [])",
        "        out = forward_from_layer(model, resid, layer, [])",
        "tests/test_interventions.py::test_a_start_checked_against_the_models_output_settles_the_skip_only_when_it_matches",
    ),
    (
        "a patched run's start is checked against its own run, not the model's output",
        "helpers/engine/forward.py",
        "            return checked_start(model, resid[:2], layer, expected())",
        "            return checked_start(model, resid[:2], layer, _fast_from_layer(model, resid[:2], layer, []))",
        "tests/test_recompute.py::test_a_patched_runs_start_that_misses_the_models_output_settles_nothing",
    ),
    (
        "a patched run's start checks run the plain checks again",
        "helpers/engine/forward.py",
        "            if start and not suffix_ok(model, resid, layer, prefix, reference=reference):",
        "            if start and not suffix_ok(model, resid, layer, prefix):",
        "tests/test_recompute.py::test_a_patched_runs_start_is_checked_against_the_models_output",
    ),
    (
        "a circuit diagram draws every edge",
        "helpers/notebook/plotting.py",
        '    strongest = sorted(edges, key=lambda e: -abs(e["weight"]))[:max_edges]',
        '    strongest = sorted(edges, key=lambda e: -abs(e["weight"]))',
        "tests/test_plotting.py::test_a_large_circuit_diagram_draws_its_strongest_edges_in_a_few_traces",
    ),
    (
        "per-head grids put the layers along the heads' axis",
        "helpers/notebook/plotting.py",
        "    _, n_layers, n_heads = arr.shape",
        "    _, n_heads, n_layers = arr.shape",
        "tests/test_plotting.py::test_per_head_panels_are_layer_by_head_grids_on_one_scale",
    ),
    (
        "rank agreement at full precision, float noise deciding the ranks of cells a patch cannot change",
        "helpers/engine/metrics.py",
        "    exact, estimate = (np.round(np.asarray(as_numpy(x), dtype=float).ravel(), DIGITS) for x in (exact, estimate))",
        "    exact, estimate = (np.asarray(as_numpy(x), dtype=float).ravel() for x in (exact, estimate))",
        "tests/test_patching.py::test_rank_agreement_is_not_decided_by_float_noise_where_a_patch_changes_nothing",
    ),
    (
        "top-k hits stop counting a row one word early",
        "helpers/analyses/head_functions.py",
        "live = live[count[live] < k]",
        "live = live[count[live] < k - 1]",
        "tests/test_head_functions.py::test_top_k_hits_by_vocabulary_bands_equal_the_full_ranking",
    ),
    (
        "a target's own column counts as a word that beats it",
        "helpers/analyses/head_functions.py",
        "above[inside.nonzero().squeeze(1), targets[live][inside] - first] = False",
        "pass",
        "tests/test_head_functions.py::test_top_k_hits_by_vocabulary_bands_equal_the_full_ranking",
    ),
    (
        "key/value prefixes give the run's first block a view instead of its own keys",
        "helpers/engine/kv_cache.py",
        "if layer < from_layer:",
        "if layer <= from_layer:",
        "tests/test_recompute.py::test_suffix_runs_equal_full_recompute_on_every_family",
    ),
    (
        "a band of forks' edge scores read only the senders before its first fork",
        "helpers/methods/edges.py",
        "upto = max(graph.sender_slots_before(r) for r in rs)  # only senders before a fork",
        "upto = min(graph.sender_slots_before(r) for r in rs)  # only senders before a fork",
        "tests/test_edges.py::test_every_family_exact",
    ),
    (
        "a fork adds the kept senders' running total where it should take it away",
        "helpers/methods/edges.py",
        "mix = torch.cat([mix, -minus_kept[:, :, None]], 2)",
        "mix = torch.cat([mix, minus_kept[:, :, None]], 2)",
        "tests/test_edges.py::test_every_family_exact",
    ),
    (
        "a leave-one-out starts one block after its left-out sender, from the union's run",
        "helpers/methods/edges.py",
        "from_union = torch.where(dropped & union, sender_layer, n_layers - 1).min(1).values",
        "from_union = (torch.where(dropped & union, sender_layer, n_layers - 1).min(1).values + 1).clamp(max=n_layers - 1)",
        "tests/test_edges.py::test_leave_one_outs_start_from_the_union_run_exactly",
    ),
    (
        "the union's run recorded without its own left-out senders",
        "helpers/methods/edges.py",
        "patches = _node_interventions(ectx.graph, dropped[None], layer, n_layers)",
        "patches = _node_interventions(ectx.graph, 0 * dropped[None], layer, n_layers)",
        "tests/test_edges.py::test_leave_one_outs_start_from_the_union_run_exactly",
    ),
    (
        "hooks recorded in a suffix run miss the base run's positions before it",
        "helpers/engine/forward.py",
        "recorded[name] = torch.cat([before.repeat(n_var, *[1] * (before.dim() - 1)), act], 1)",
        "recorded[name] = torch.cat([0 * before.repeat(n_var, *[1] * (before.dim() - 1)), act], 1)",
        "tests/test_recompute.py::test_suffix_runs_equal_full_recompute_on_every_family",
    ),
    (
        "gradients from the first difference give every row the first prompt's cached keys and values",
        "helpers/methods/attribution_patching.py",
        "rows=torch.arange(lo, hi) // steps)",
        "rows=0 * torch.arange(lo, hi))",
        "tests/test_edges.py::test_edge_scores_from_the_first_difference_equal_every_position",
    ),
    (
        "gradients from the first difference dotted with the changes of the first positions",
        "helpers/methods/edges.py",
        "delta = ectx.clean_outputs[prompt, -n_pos:] - ectx.corrupted_outputs[prompt, -n_pos:]",
        "delta = ectx.clean_outputs[prompt, :n_pos] - ectx.corrupted_outputs[prompt, :n_pos]",
        "tests/test_edges.py::test_edge_scores_from_the_first_difference_equal_every_position",
    ),
    (
        "attribution's gradients from the first difference laid at the first positions",
        "helpers/methods/attribution_patching.py",
        "grads[h] = torch.cat([g.new_zeros(g.shape[0], n_pos - g.shape[1], *g.shape[2:]), g], 1)",
        "grads[h] = torch.cat([g, g.new_zeros(g.shape[0], n_pos - g.shape[1], *g.shape[2:])], 1)",
        "tests/test_attribution_patching.py::test_attribution_from_the_first_difference_equals_every_position",
    ),
    (
        "a band of forks skips the first row stored since the band began",
        "helpers/methods/edges.py",
        "new = ((rows >= self.band_rows[:, None])",
        "new = ((rows > self.band_rows[:, None])",
        "tests/test_edges.py::test_forks_read_in_bands_and_split_where_hooked_change_no_number",
    ),
    (
        "a band of forks counts its first rows twice",
        "helpers/methods/edges.py",
        "self.band, self.band_rows = band, stored",
        "self.band, self.band_rows = band, 0 * stored",
        "tests/test_edges.py::test_forks_read_in_bands_and_split_where_hooked_change_no_number",
    ),
    (
        "no block forks its q/k/v inputs, hooked or not",
        "helpers/engine/forks.py",
        'any(fork.has_hooks(dir="fwd") for fork in forks)',
        "False",
        "tests/test_edges.py::test_forks_read_in_bands_and_split_where_hooked_change_no_number",
    ),
    (
        "every block forks its q/k/v inputs",
        "helpers/engine/forks.py",
        'any(fork.has_hooks(dir="fwd") for fork in forks)',
        "True",
        "tests/test_edges.py::test_blocks_without_a_hooked_fork_run_unforked",
    ),
    (
        "a forward's first variant left out of it",
        "helpers/engine/chunks.py",
        "groups.append(order[cut[j] : j])",
        "groups.append(order[cut[j] + 1 : j])",
        "tests/test_patching.py::test_forwards_grouped_by_start_layer_cost_least",
    ),
    (
        "forwards cut every max_variants in start order",
        "helpers/engine/chunks.py",
        "for i in range(max(0, j - max(1, max_variants)), j):",
        "for i in [max(0, j - max(1, max_variants))] if j % max(1, max_variants) == 0 or j == n else []:",
        "tests/test_patching.py::test_forwards_grouped_by_start_layer_cost_least",
    ),
    (
        "a post-norm run that starts late takes the earlier layers' head changes as none",
        "helpers/methods/edges.py",
        "self.changes[layer] = (clean - self.corrupted[layer])[None]",
        "self.changes[layer] = (0 * clean)[None]",
        "tests/test_edges.py::test_runs_that_start_at_the_first_receiver_change_no_number",
    ),
    (
        "a node-level circuit's left-out MLPs not patched",
        "helpers/methods/edges.py",
        'out.append(Intervention(get_act_name("mlp_out", block), "corrupted", dropped[:, mlp][:, None, :]))',
        'out.append(Intervention(get_act_name("mlp_out", block), "corrupted", torch.zeros_like(dropped[:, mlp][:, None, :])))',
        "tests/test_edges.py::test_node_level_circuits_run_as_one_patched_forward_exactly",
    ),
    (
        "a circuit that drops an edge into the logits taken for node-level",
        "helpers/methods/edges.py",
        'matters[:, [r.kind == "logits" for r in graph.receivers]] = True',
        "pass",
        "tests/test_edges.py::test_node_level_circuits_run_as_one_patched_forward_exactly",
    ),
    (
        "chunked gradients not averaged over the IG steps",
        "helpers/methods/attribution_patching.py",
        "return {n: g / steps for n, g in grads_out.items()}",
        "return {n: g for n, g in grads_out.items()}",
        "tests/test_attribution_patching.py::test_integrated_gradients_are_complete_at_the_embeddings",
    ),
    (
        "chunked gradients summed onto the wrong prompts",
        "helpers/methods/attribution_patching.py",
        "row = torch.arange(lo, hi, device=ld.device)",
        "row = torch.arange(0, hi - lo, device=ld.device)",
        "tests/test_attribution_patching.py::test_gradients_in_memory_bounded_chunks_equal_one_batch",
    ),
    (
        "gap normalisation ignores the corrupted run",
        "helpers/analyses/circuits.py",
        'baseline = logit_diff(model(reference_tokens), answers).mean().item() if normalisation == "gap" else 0.0',
        "baseline = 0.0",
        "tests/test_circuits.py::test_one_circuit_one_verdict_knockout_from_corrupted_equals_discoverys_closure",
    ),
    (
        "core heads may exceed the model",
        "helpers/analyses/discovery.py",
        "return abs(1.0 - value) <= 1.0 - target + 1e-9",
        "return value >= target",
        "tests/test_discovery.py::test_core_heads_reproduce_the_model_not_exceed_it",
    ),
    (
        "MIB import drops group edges",
        "helpers/analyses/mib_format.py",
        'mask[s, r] |= bool(entry["in_graph"])',
        'mask[s, r] = bool(entry["in_graph"]) and not mask[s, r]',
        "tests/test_discovery.py::test_mib_json_round_trips_a_circuit_and_its_scores",
    ),
    (
        "a tokenizer's refusal reported as bad input",
        "helpers/runner/batch.py",
        'status = "refused" if model else "bad-input"',
        'status = "bad-input"',
        "tests/test_real_models.py::test_a_task_the_tokenizer_cannot_write_is_a_refused_row_not_bad_input",
    ),
    (
        "path patching premise (sender run)",
        "helpers/methods/path_patching.py",
        'return run_patched(ctx, [Intervention(_z(layer), "source", senders), *frozen], len(heads), record)',
        'return run_patched(ctx, [Intervention(_z(max(layer - 1, 0)), "source", senders), *frozen], len(heads), record)',
        "tests/test_path_patching.py::test_a_sender_leaves_the_inputs_of_its_own_and_earlier_layers_unchanged",
    ),
    (
        "minimality reports the wrong K",
        "helpers/analyses/circuits.py",
        'best[v] = {"score": float(scores[start + i]), "K": list(k[v])}',
        'best[v] = {"score": float(scores[start + i]), "K": list(k[v][:-1])}',
        "tests/test_circuits.py::test_minimality_and_completeness",
    ),
    (
        "attention shift patches the candidate in every layer",
        "helpers/analyses/head_functions.py",
        "masks[i, 0, c.head] = c.layer == layer",
        "masks[i, 0, c.head] = True",
        "tests/test_head_functions.py::test_attention_shift_is_zero_for_non_earlier_heads",
    ),
    (
        "compatibility mode not enabled",
        "helpers/task/models.py",
        "    model.enable_compatibility_mode()\n",
        "",
        "tests/test_models.py::test_compat_mode_and_eval",
    ),
    (
        "report swallows a schema error",
        "helpers/runner/report.py",
        "            errors[f.stem] = str(err)\n",
        "            continue\n",
        "tests/test_report.py::test_a_renamed_key_is_a_clear_error_on_the_page_and_in_the_exit_code_not_a_missing_row",
    ),
    (
        "results written without validation",
        "helpers/notebook/session.py",
        '        validate_results(template, data, where=f"the results of {template}")\n',
        "",
        "tests/test_report.py::test_results_are_validated_before_they_are_written",
    ),
    (
        "an import up the layers hidden in a function",
        "helpers/task/params.py",
        "def load_params(",
        "def _cycle():\n    from helpers.runner.cli import main\n\n    return main\n\n\ndef load_params(",
        "tests/test_architecture.py::test_every_module_sits_in_a_layer_and_every_import_points_down",
    ),
    (
        "rank_heads 'neg' ranks by the value",
        "helpers/schema/heads.py",
        '"neg": lambda v: -v',
        '"neg": lambda v: v',
        "tests/test_heads.py::test_rank_heads_orders_by_sign",
    ),
    (
        "heads_above drops heads at the threshold",
        "helpers/schema/heads.py",
        "if s.value >= threshold",
        "if s.value > threshold",
        "tests/test_heads.py::test_heads_above_keeps_the_heads_at_or_over_the_threshold_highest_first",
    ),
    (
        "a role threshold read from the wrong field",
        "helpers/analyses/roles.py",
        '"prev_token": "previous_token"}',
        '"prev_token": "duplicate_token"}',
        "tests/test_head_functions.py::test_roles_follow_the_rules_and_allow_unclassified",
    ),
    (
        "the runner renders no pending figure (PNGs never written)",
        "helpers/notebook/figures.py",
        "_render_twice(pio.read_json(path), target)",
        "pio.read_json(path)",
        "tests/test_notebooks.py::test_json_artifact_contents",
    ),
    (
        "figures imports plotly at module level",
        "helpers/notebook/figures.py",
        "from typing import TYPE_CHECKING\n",
        "from typing import TYPE_CHECKING\n\nimport plotly.io  # noqa: F401\n",
        "tests/test_architecture.py::test_planning_and_reporting_modules_do_not_import_torch",
    ),
    (
        "the probe takes a discarded hook edit for a real one",
        "helpers/engine/capabilities.py",
        'verdicts[hook] = bool((edited - probe["output"]).abs().max() > 1e-6)',
        "verdicts[hook] = True",
        "tests/test_families.py::test_sweep_equals_transformer_lens[opt-head_pattern]",
    ),
    (
        "the probe takes an MLP-only edit for one that reaches the residual stream",
        "helpers/engine/capabilities.py",
        "verdicts[hook] = bool((runs[1] - runs[0]).abs().max() > 1e-3)",
        "verdicts[hook] = True",
        "tests/test_families.py::test_sweep_equals_transformer_lens[llama-resid_mid]",
    ),
    (
        "every registered scoring method answers as EAP",
        "helpers/methods/scoring.py",
        "return SCORERS[method].score(ectx, options or ScoringOptions())",
        'return SCORERS["eap"].score(ectx, options or ScoringOptions())',
        "tests/test_discovery.py::test_every_registered_scoring_method_scores_the_graphs_edges_alike",
    ),
    (
        "ACDC's scores forget what its pass measured",
        "helpers/methods/scoring.py",
        "effects[s, r] = abs(1 - f) - distance",
        "effects[s, r] = 0.0",
        "tests/test_discovery.py::test_every_registered_scoring_method_scores_the_graphs_edges_alike",
    ),
    (
        "cached keys and values one position short",
        "helpers/engine/kv_cache.py",
        "(k[:n_prompts, :, :start], v[:n_prompts, :, :start]) if rows is None",
        "(k[:n_prompts, :, : start - 1], v[:n_prompts, :, : start - 1]) if rows is None",
        "tests/test_recompute.py::test_suffix_runs_equal_full_recompute_on_every_family",
    ),
    (
        "a suffix run takes uncut source values",
        "helpers/engine/interventions.py",
        "from_position(source_value(sources, iv), iv.hook, start)",
        "source_value(sources, iv)",
        "tests/test_recompute.py::test_suffix_runs_equal_full_recompute_on_every_family",
    ),
    (
        "the fast-path verifier accepts anything",
        "helpers/engine/shortcuts.py",
        "                ok = out.shape == reference.shape and bool(",
        "                ok = True or bool(",
        "tests/test_recompute.py::test_a_wrong_suffix_falls_back_to_the_full_recompute",
    ),
    (
        "sweeps recompute every position",
        "helpers/methods/patching.py",
        "torch.where(per_position.any(1), per_position.int().argmax(1), n_pos)",
        "torch.where(per_position.any(1), 0, n_pos)",
        "tests/test_recompute.py::test_sweeps_run_each_variant_from_the_first_position_it_changes",
    ),
    (
        "the last MLP cut to one position under a hook that reads it",
        "helpers/engine/shortcuts.py",
        '            if rest not in _BEFORE_THE_MLP and not rest.startswith(("attn.", "ln1.", "ln1_post.")):\n                return True',
        "            pass",
        "tests/test_recompute.py::test_hooks_on_the_last_mlp_keep_it_at_every_position",
    ),
    (
        "edge evaluations start one position after the first difference",
        "helpers/methods/edges.py",
        "return min(int(differs[0]) if len(differs)",
        "return min(int(differs[0]) + 1 if len(differs)",
        "tests/test_recompute.py::test_edge_evaluations_recompute_from_the_first_difference",
    ),
    (
        "edge evaluations start one block after the first receiver",
        "helpers/methods/edges.py",
        "first = torch.where(absent, layer, n_layers).min(1).values.clamp(max=n_layers - 1)",
        "first = (torch.where(absent, layer, n_layers).min(1).values + 1).clamp(max=n_layers - 1)",
        "tests/test_edges.py::test_runs_that_start_at_the_first_receiver_change_no_number",
    ),
    (
        "a path into the last MLP counted as a path to the logits",
        "helpers/methods/edges.py",
        "            out[part] = reached[:, logits]",
        "            out[part] = reached[:, logits - 1]",
        "tests/test_edges.py::test_circuits_without_a_path_are_the_corrupted_run",
    ),
    (
        "the path search stops after one step",
        "helpers/methods/edges.py",
        "                if torch.equal(grown, live):",
        "                if True:",
        "tests/test_edges.py::test_circuits_without_a_path_are_the_corrupted_run",
    ),
    (
        "the core-heads pruning keeps dropping heads after the rest stops reproducing the model",
        "helpers/analyses/discovery.py",
        "if not fewer or not reproduces(v := closures([fewer])[0], target):",
        "if not fewer or (v := closures([fewer])[0]) is None:",
        "tests/test_discovery.py::test_core_heads_pruning_stops_where_the_rest_no_longer_reproduces",
    ),
    (
        "the size scan returns a later passing size of its call",
        "helpers/analyses/discovery.py",
        "hit = next((k for k in part if passes(values[k])), None)",
        "hit = next((k for k in reversed(part) if passes(values[k])), None)",
        "tests/test_discovery.py::test_first_passing_scans_smallest_first_and_stops_at_the_call_that_finds_it",
    ),
    (
        "a repeated circuit's value goes to another circuit",
        "helpers/methods/edges.py",
        "ectx.corrupted_logit_diff).to(values.dtype)[copy_of]",
        "ectx.corrupted_logit_diff).to(values.dtype)[copy_of.flip(0)]",
        "tests/test_discovery.py::test_a_circuit_given_twice_is_run_once_with_the_same_value",
    ),
    (
        "a run's fingerprint hashes every helpers module",
        "helpers/runner/batch.py",
        'modules = dependencies.depends_on(template, graph) | dependencies.closure({"runner.run"}, graph)',
        "modules = set(graph)",
        "tests/test_batch.py::test_a_run_reruns_when_the_code_it_executes_changes_and_only_then",
    ),
    (
        "a module's imports inside functions are not dependencies",
        "helpers/runner/dependencies.py",
        "            visit(child)\n",
        "            visit(child) if not isinstance(child, ast.FunctionDef) else None\n",
        "tests/test_architecture.py::test_the_cycle_check_sees_an_import_hidden_in_a_function",
    ),
    (
        "the runner forgets which figures it could not render",
        "helpers/runner/run.py",
        'set_missing_figures(staging / f"{template}.json", unrendered)',
        "None",
        "tests/test_batch.py::test_figures_a_starved_renderer_could_not_write_are_reported_and_rendered_later",
    ),
    (
        "a figure that could not be rendered is dropped",
        "helpers/notebook/figures.py",
        "            left.append(target.relative_to(folder).as_posix())",
        "            path.unlink()",
        "tests/test_plotting.py::test_a_pending_figure_that_cannot_be_rendered_is_one_line_and_stays_pending",
    ),
    (
        "edge scores pair each sender's delta with the wrong receiver gradient entries",
        "helpers/methods/edges.py",
        "columns.append(per_prompt(received[hook]).permute(0, 1, 3, 2).reshape(-1, len(rs)))",
        "columns.append(per_prompt(received[hook]).reshape(-1, len(rs)))",
        "tests/test_edges.py::test_eap_sums_over_receivers_to_the_heads_attribution",
    ),
    (
        "the session seeds torch with 0 whatever the params say",
        "helpers/notebook/session.py",
        "torch.manual_seed(params.seed)",
        "torch.manual_seed(0)",
        "tests/test_params.py::test_the_params_seed_seeds_torch_in_the_notebook",
    ),
    (
        "the importance estimate's move taken the wrong way",
        "helpers/methods/importance.py",
        "((mean - acts[name].detach()) * g)",
        "((acts[name].detach() - mean) * g)",
        "tests/test_importance.py::test_the_estimate_is_the_derivative_along_the_ablation",
    ),
    (
        "the caller's heads dropped from the exact importance",
        "helpers/methods/importance.py",
        "chosen |= {(int(layer), int(head)) for layer, head in also}",
        "pass",
        "tests/test_importance.py::test_only_the_chosen_heads_run_exactly",
    ),
    (
        "a metric that reads the full vocabulary given only the answers' two columns",
        "helpers/engine/forward.py",
        'with answer_columns(model, answers) if metric.vocabulary == "answers" else nullcontext(answers) as columns:',
        "with answer_columns(model, answers) as columns:",
        "tests/test_recompute.py::test_every_metric_of_the_runner_equals_the_plain_forward",
    ),
    (
        "a metric that reads every position run on the positions after the patch only",
        "helpers/engine/forward.py",
        "suffix = prefix is not None and last_only and (",
        "suffix = prefix is not None and (",
        "tests/test_recompute.py::test_every_metric_of_the_runner_equals_the_plain_forward",
    ),
    (
        "noising patches the clean run's values into the corrupted run, as denoising does",
        "helpers/task/prompts.py",
        "return self.denoising().swapped()",
        "return self.denoising()",
        "tests/test_patching.py::test_the_pair_says_which_run_is_patched",
    ),
]


def run(selected: str = "") -> list[tuple[str, str]]:
    rows = []
    for name, rel, old, new, test in MUTATIONS:
        if selected not in name:
            continue
        path = ROOT / rel
        source = path.read_text()
        if old not in source:
            rows.append((name, "stale"))
            print(f"{'stale':>10}  {name}  ({rel} no longer holds the text it breaks)", flush=True)
            continue
        path.write_text(source.replace(old, new, 1))
        try:
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test]
            failed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode != 0
        finally:
            path.write_text(source)
        rows.append((name, "caught" if failed else "NOT CAUGHT"))
        print(f"{rows[-1][1]:>10}  {name}  ({test})", flush=True)
    return rows


if __name__ == "__main__":
    results = run(sys.argv[1] if len(sys.argv) > 1 else "")
    sys.exit(0 if all(status == "caught" for _, status in results) else 1)
