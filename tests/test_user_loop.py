import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ditplan
from ditplan.cli import main
from ditplan.comparison.report import build_report, figure_points, load_run_data
from ditplan.errors import UserError
from ditplan.evaluators.evaluate import evaluate_plan
from ditplan.models.adapters import adapter_from_spec
from ditplan.spec import load_spec
from ditplan.workflow import check_names
from tests.conftest import DATA, save_tiny_dit_pipeline

TINY_RUN = """
name: tiny-run
model:
  kind: dit
  config: {{sample_size: 16, patch_size: 4, in_channels: 4, out_channels: 8, num_layers: 2,
           num_attention_heads: 2, attention_head_dim: 8, num_embeds_ada_norm: 10}}
  device: cpu
sampler: {{scheduler: dpmsolver++, num_steps: 4, guidance_scale: 3.0, batch_size: 4}}
workload: {{classes: [1, 2, 3, 4], samples_per_condition: 1, seed: 0}}
evaluation: {{cache_dir: {cache}, latency_repeats: 1}}
greedy: {{thresholds: [0.05, 0.5], calibration_samples: 2}}
search:
  trials: 4
  workers: 2
  samples: 4
  space: {{layer_groups: 2, step_segments: 2}}
  refine: {{metrics: [rel_l1, latency_ratio], samples: 4, latency_repeats: 1}}
output_dir: {out}
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    experiment = root / "tiny-run.yaml"
    experiment.write_text(TINY_RUN.format(cache=root / "cache", out=root / "run"))
    run_dir = ditplan.run(experiment, show_progress=False)
    return experiment, run_dir


def learned_trials(run_dir):
    return [t for t in load_run_data(run_dir).trials if t.warm is None]


def test_run_produces_greedy_plans_a_study_a_report_and_exported_plans(finished_run):
    _, run_dir = finished_run
    assert sorted(p.name for p in (run_dir / "greedy").iterdir()) == ["greedy-D1.yaml", "greedy-D2.yaml"]
    data = load_run_data(run_dir)
    assert {t.warm for t in data.trials} == {"greedy", None} and len(learned_trials(run_dir)) == 4
    report = build_report(data)
    assert [(f.label, f.plans, f.infeasible) for f in report.fronts] == [("greedy", 2, 0), ("learned", 4, 0)]
    assert (report.held_out.samples, report.held_out.first_seed) == (4, 20000)
    kinds = [r.kind for r in report.rows]
    assert kinds[:3] == ["dense", "greedy", "greedy"] and set(kinds[3:]) == {"learned"}  # the front, on held-out seeds
    dense = report.row("dense").held_out
    assert (dense["rel_l1"], dense["latency_ratio"], dense["flops_ratio"]) == (0.0, 1.0, 1.0)
    assert "## Held-out rel_l1 × latency (4 held-out samples, seeds 20000…" in (run_dir / "report" / "comparison.md").read_text()
    assert (run_dir / "report" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    points = figure_points([report])  # the figure: held-out quality × held-out latency of every side
    assert [(p.name, p.kind) for p in points] == [(r.name, r.kind) for r in report.rows]
    assert all(p.quality == r.held_out["rel_l1"] and p.latency == r.held_out["latency_ratio"]
               for p, r in zip(points, report.rows))
    assert report.row("dense").what == "dense (no acceleration)" and all(r.what for r in report.rows)
    exported = list((run_dir / "exported").glob("*.yaml"))
    assert exported
    with Image.open(run_dir / "report" / "plans.png") as grid:  # dense + each exported plan, one row each
        assert grid.height == 4 + (1 + len(exported)) * (16 + 96 + 4)
    assert "what it does" in (run_dir / "search" / "pareto_front.md").read_text()
    assert (run_dir / "search" / "mlflow.db").exists()
    artifacts = run_dir / "search" / "mlartifacts"
    assert list(artifacts.rglob("comparison/comparison.md")) and list(artifacts.rglob("comparison/plans.png"))


def test_rerunning_resumes_without_redoing_finished_stages(finished_run):
    experiment, run_dir = finished_run
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "greedy").iterdir()}
    held_out = (run_dir / "held_out.yaml").stat().st_mtime_ns
    ditplan.run(experiment, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "greedy").iterdir()} == before
    assert len(learned_trials(run_dir)) == 4  # the study was already complete
    assert (run_dir / "held_out.yaml").stat().st_mtime_ns == held_out  # the same sides: measured once


def test_running_the_copy_in_the_run_directory_resumes(finished_run, tmp_path):
    _, run_dir = finished_run
    moved = tmp_path / "elsewhere.yaml"
    moved.write_text((run_dir / "experiment.yaml").read_text())
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "greedy").iterdir()}
    for experiment in (run_dir / "experiment.yaml", moved):
        assert ditplan.run(experiment, show_progress=False) == run_dir
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "greedy").iterdir()} == before
    assert len(learned_trials(run_dir)) == 4


def test_export_names_stay_inside_out(finished_run, tmp_path, monkeypatch):
    import dataclasses

    import ditplan.comparison.export as export

    _, run_dir = finished_run
    select = export.select_plans
    data = load_run_data(run_dir)
    report = build_report(data)
    (chosen,) = select(report, "top:1")
    escaped = dataclasses.replace(chosen, name="../../escaped")
    report.held_out = dataclasses.replace(report.held_out, sides=(*report.held_out.sides, dataclasses.replace(
        next(s for s in report.held_out.sides if s.name == chosen.name), name="../../escaped")))
    monkeypatch.setattr(export, "select_plans", lambda *a: [escaped])
    out = tmp_path / "a" / "b" / "out"
    paths = export.export_selected(data, report, "top:1", out)
    assert [p.name for p in paths] == ["tiny-run-.._.._escaped.yaml"] and paths[0].parent == out
    assert list(tmp_path.rglob("*.yaml")) == paths


def test_safe_file_names_never_leave_their_folder():
    from ditplan.comparison.export import safe_file_name

    assert safe_file_name("../../x", ".yaml") == "_.._x.yaml"
    assert safe_file_name("/etc/passwd", ".yaml") == "_etc_passwd.yaml"
    assert safe_file_name("...", ".yaml") == "plan.yaml"
    assert safe_file_name("run-D1", ".yaml") == "run-D1.yaml"


def test_an_exported_plan_reproduces_its_recorded_quality_exactly(finished_run, tmp_path):
    _, run_dir = finished_run
    main(["export", str(run_dir), "--select", "fastest:rel_l1<=10", "--out", str(tmp_path)])
    (path,) = list(tmp_path.glob("*.yaml"))
    plan = ditplan.load_plan(path)
    assert plan.provenance["selected_by"] == "fastest:rel_l1<=10"
    spec = load_spec(run_dir / "experiment.yaml")
    adapter = adapter_from_spec(spec.model)
    assert plan.provenance["evaluated_on"] == {"set": "search", "first_seed": 10000, "samples": 4}
    results = evaluate_plan(spec, adapter, plan, samples=4, seed_set="search")
    assert results["rel_l1"][0].value == plan.provenance["metrics"]["rel_l1"]
    assert results["flops_ratio"][0].value == pytest.approx(plan.provenance["metrics"]["flops_ratio"], rel=1e-12)
    assert plan.provenance["held_out"] == {"first_seed": 20000, "samples": 4}
    held_out = evaluate_plan(spec, adapter, plan)  # the held-out set by default
    assert held_out["rel_l1"][0].value == pytest.approx(plan.provenance["held_out_metrics"]["rel_l1"], rel=1e-4)


def test_each_stage_uses_its_own_seed_set(finished_run):
    _, run_dir = finished_run
    data = load_run_data(run_dir)
    sets = {name: data.spec.seed_set(name) for name in ("calibration", "search", "held_out")}
    for plan in data.greedy.values():
        assert plan.provenance["calibration"]["seeds"] == sets["calibration"].seeds
    for trial in data.trials:
        assert ditplan.load_plan(trial.plan_path).provenance["evaluated_on"]["first_seed"] == sets["search"].seeds[0]
    assert (data.held_out.first_seed, data.held_out.samples) == (sets["held_out"].seeds[0], len(sets["held_out"].seeds))
    assert {s.name for s in data.held_out.of_kind("greedy")} == set(data.greedy)


def test_bad_selection_rules_and_bounds_are_user_errors(finished_run, tmp_path):
    _, run_dir = finished_run
    with pytest.raises(UserError, match="unknown selection rule"):
        ditplan.export(run_dir, "fastest", tmp_path)
    with pytest.raises(UserError, match="no plan has held-out rel_l1 <= -1.0"):
        ditplan.export(run_dir, "fastest:rel_l1<=-1", tmp_path)


def test_a_search_warm_starts_from_the_plans_ditplan_export_wrote(finished_run, tmp_path):
    from ditplan.plansearch.storage import load_finished_study
    from ditplan.rundir import SearchDir

    _, run_dir = finished_run
    exported = sorted((run_dir / "exported").glob("*.yaml"))
    assert exported
    experiment = run_dir / "experiment.yaml"
    main(["search", "--experiment", str(experiment), "--warm-start", str(run_dir / "exported"),
          "--out", str(tmp_path / "again"), "--trials", "1"])
    study = load_finished_study(load_spec(experiment), SearchDir(tmp_path / "again"))
    warm = {t.user_attrs["name"]: t for t in study.get_trials() if "source" in t.user_attrs}
    names = {str(ditplan.load_plan(p).provenance.get("name") or p.stem) for p in exported}  # D1 …, else the file's
    assert set(warm) == names and all(t.state.name == "COMPLETE" for t in warm.values())  # each ran
    assert (tmp_path / "again" / "pareto_front.md").exists()


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a ditplan run directory"):
        ditplan.compare([tmp_path], tmp_path / "report")


@pytest.mark.parametrize("path", sorted((DATA.parent.parent / "ditplan" / "experiments").glob("*.yaml"))
                         + sorted((DATA.parent.parent / "benchmarks").glob("*/*.yaml")), ids=lambda p: p.name)
def test_shipped_experiment_files_validate_offline(path):
    spec = load_spec(path)
    check_names(spec)  # every strategy, cache, curve and baseline it names exists
    assert spec.search.objectives and spec.sampler.num_steps > 0


def test_relative_paths_resolve_once_against_the_given_file(tmp_path):
    from ditplan.spec import resolved_experiment_text

    copy = tmp_path / "runs" / "tiny-pixart" / "experiment.yaml"
    copy.parent.mkdir(parents=True)
    copy.write_text(resolved_experiment_text(DATA / "tiny-pixart.yaml"))
    spec = load_spec(copy)
    assert spec == load_spec(DATA / "tiny-pixart.yaml")
    assert spec.model.prompt_embeddings == str((DATA / "tiny-pixart-prompts.safetensors").absolute())


TINY_PIXART_RUN = """
name: tiny-pixart-run
model:
  kind: pixart
  config: {sample_size: 8, patch_size: 2, in_channels: 4, out_channels: 8, num_layers: 2,
           num_attention_heads: 2, attention_head_dim: 8, cross_attention_dim: 16, caption_channels: 32,
           norm_num_groups: 4}
  prompt_embeddings: embeddings/prompts.safetensors
  device: cpu
sampler: {scheduler: ddim, num_steps: 3, guidance_scale: 4.5, batch_size: 4}
workload: {prompts: ["a red circle", "a blue square"], samples_per_condition: 1, seed: 0}
evaluation: {cache_dir: cache, latency_repeats: 1}
greedy: {thresholds: [0.5], calibration_samples: 2}
search: {trials: 2, workers: 1, samples: 2, space: {layer_groups: 1, step_segments: 1},
         refine: {metrics: [rel_l1, latency_ratio], samples: 2, latency_repeats: 1}}
output_dir: runs/tiny-pixart-run
"""


@pytest.mark.slow  # a whole run of the tiny PixArt (≈ 1 min)
def test_the_tiny_pixart_runs_to_the_end_from_a_relative_prompt_embeddings_path(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "embeddings").mkdir(parents=True)
    shutil.copy(DATA / "tiny-pixart-prompts.safetensors", project / "embeddings" / "prompts.safetensors")
    (project / "pixart.yaml").write_text(TINY_PIXART_RUN)
    monkeypatch.chdir(tmp_path)  # the run directory and cache land here; the embeddings are found next to the file
    run_dir = ditplan.run(project / "pixart.yaml", show_progress=False)
    assert list((run_dir / "exported").glob("*.yaml"))
    assert ditplan.run(run_dir / "experiment.yaml", show_progress=False) == run_dir  # the copy resumes


@pytest.mark.slow  # a whole run of the tiny DiT in bfloat16 (≈ 1 min)
def test_a_bfloat16_run_of_the_tiny_dit_completes(tmp_path):
    experiment = tmp_path / "tiny-bf16.yaml"
    text = TINY_RUN.format(cache=tmp_path / "cache", out=tmp_path / "run").replace("device: cpu", "device: cpu\n  dtype: bfloat16")
    experiment.write_text(text)
    run_dir = ditplan.run(experiment, show_progress=False)
    assert load_spec(run_dir / "experiment.yaml").model.dtype == "bfloat16"
    assert list((run_dir / "exported").glob("*.yaml"))


LATENT_RUN = """
name: tiny-latent-run
model: {kind: dit, source: models/tiny-dit, vae: models/tiny-dit, device: cpu}
sampler: {scheduler: dpmsolver++, num_steps: 3, guidance_scale: 3.0, batch_size: 4}
workload: {classes: [1, 2, 3], samples_per_condition: 1, seed: 0}
evaluation: {feature_extractor: tiny-colour, reference: real-images, cache_dir: cache, latency_repeats: 1}
greedy: {thresholds: [0.5], calibration_samples: 2}
search: {trials: 2, workers: 1, samples: 2, space: {layer_groups: 1, step_segments: 1},
         refine: {metrics: [fid, rel_l1, latency_ratio], samples: 8, latency_repeats: 1}}  # 8 > 6 feature dims
output_dir: runs/tiny-latent-run
"""


def latent_project(root: Path) -> Path:
    """A user's project folder: the tiny latent DiT pipeline (tiny VAE, 3-channel 16 × 16 images) under
    ``models/``, 8 real 16 × 16 RGB images under ``real-images/`` and the experiment file naming both by
    relative paths and the registered ``tiny-colour`` extractor. Returns the experiment file."""
    from PIL import Image

    save_tiny_dit_pipeline(root / "models" / "tiny-dit")
    (root / "real-images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "real-images" / f"{i}.png")
    (root / "latent.yaml").write_text(LATENT_RUN)
    return root / "latent.yaml"


# a whole run of the tiny latent DiT, FID in the held-out stage: 15 s on 2 cores, so in the fast set
def test_the_tiny_latent_dit_runs_to_the_end_with_a_registered_extractor_and_fid(tmp_path, monkeypatch):
    experiment = latent_project(tmp_path / "project")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the model and reference folders are found next to the file, not here
    root = str(Path(__file__).parent.parent)  # search workers import the plugin as the driver does
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    # the plugin registers "tiny-colour" in torch-fidelity, as a user's own extractor module would
    main(["run", "--experiment", str(experiment), "--plugin", "tests.plugins.tiny_extractor"])
    run_dir = tmp_path / "work" / "runs" / "tiny-latent-run"
    report = build_report(load_run_data(run_dir))
    assert {r.kind for r in report.rows} >= {"dense", "greedy"} and all(r.value("fid") >= 0 for r in report.rows)
    assert report.quality == "fid" and "class_agreement" not in report.row("dense").held_out  # not digits
    (greedy, *_) = report.budgets
    assert greedy.side == "greedy" and greedy.calibration_forwards > 0 and greedy.calibration_peak_mb > 0
    assert "## Held-out fid × latency" in (run_dir / "report" / "comparison.md").read_text()
    exported = list((run_dir / "exported").glob("*.yaml"))
    provenances = [ditplan.load_plan(p).provenance for p in exported]
    assert provenances and all({"fid", "ideal_flops_ratio"} <= set(p["held_out_metrics"]) for p in provenances)
    assert all(p["flops_count"] == "executed" for p in provenances)  # which count flops_ratio is
    assert list((tmp_path / "work" / "cache" / "fidelity").rglob("*ref-tiny-colour-*"))  # reference statistics cached


def test_model_and_reference_folders_resolve_against_the_experiment_file(tmp_path, monkeypatch):
    experiment = latent_project(tmp_path / "project")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    spec = load_spec(experiment)
    folder = str(tmp_path / "project" / "models" / "tiny-dit")
    assert (spec.model.source, spec.model.vae) == (folder, folder)
    assert spec.evaluation.reference == str(tmp_path / "project" / "real-images")
    assert spec.evaluation.cache_dir == "cache" and spec.output_dir == "runs/tiny-latent-run"  # outputs: the cwd
    adapter = adapter_from_spec(spec.model, spec.workload.all_conditions())
    assert adapter.vae is not None and adapter.num_tokens == 16


@pytest.mark.parametrize("source, kept", [("facebook/DiT-XL-2-512", True), ("embedded", True),
                                          ("./modles/my-dit", False), ("models/a/b", False), ("~/dit", False)])
def test_hub_ids_and_embedded_names_stay_names_and_paths_resolve(tmp_path, source, kept):
    from ditplan.spec import resolve_paths

    data = {"model": {"source": source, "vae": source}, "evaluation": {"reference": "digits-held-out"}}
    out = resolve_paths(data, tmp_path)
    expected = source if kept else os.path.abspath(tmp_path / os.path.expanduser(source))
    assert out["model"] == {"source": expected, "vae": expected}
    assert out["evaluation"] == {"reference": "digits-held-out"}
    assert data["model"] == {"source": source, "vae": source}  # the caller's dict is left as it was


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path, capsys):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(LATENT_RUN)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--experiment", str(experiment), "--plugin", "no_such_plugin_module"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: --plugin no_such_plugin_module: cannot import it")
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == [experiment]


def test_a_mistyped_relative_model_folder_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    experiment = tmp_path / "project" / "exp.yaml"
    experiment.parent.mkdir()
    experiment.write_text(LATENT_RUN.replace("source: models/tiny-dit", "source: ./models/tiny-dti"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--experiment", str(experiment), "--out", "out"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"model.source folder {tmp_path / 'project' / 'models' / 'tiny-dti'} does not exist" in err
    assert not (tmp_path / "out").exists()


def test_the_readmes_python_block_runs_as_written_on_a_finished_run(finished_run, tmp_path, monkeypatch):
    """The README's "From Python" block, with the shipped quickstart's name swapped for the tiny finished run's
    file: running it again resumes (nothing is recomputed) and the knee plan is exported."""
    experiment, run_dir = finished_run
    text = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = re.search(r"From Python:\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet.replace('"quickstart"', repr(str(experiment))), "README.md", "exec"), namespace)
    assert namespace["run_dir"] == run_dir and len(namespace["plans"]) == 1
    assert namespace["plans"][0].parent == Path("plans") and (tmp_path / namespace["plans"][0]).exists()
