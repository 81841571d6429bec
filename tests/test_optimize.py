"""`optimize`: the search space comes from the registry's declarations, the budget is the benchmark's paired test, the
search is anytime and resumable, and its pipeline, card, report and log are what it says it chose."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import TinyFeatureExtractor
from dit_optimum import DiTOptimumError, DiTOptimumPipeline
from dit_optimum.benchmark import run_benchmark
from dit_optimum.benchmark.contexts import VariantContext
from dit_optimum.benchmark.report import write_report
from dit_optimum.cli import main
from dit_optimum.evaluation.domain import ClassifierRecipe, domain_classifier
from dit_optimum.evaluation.reference import real_split
from dit_optimum.optimizer import QualityBudget, SearchSettings, optimize, search_space
from dit_optimum.optimizer import search as search_module
from dit_optimum.optimizer.search import beats
from dit_optimum.optimizer.space import Candidate, is_student, search_bases
from dit_optimum.schemas import RESULTS, SEARCH_LOG, read_json_file
from dit_optimum.techniques.caching import SAVED_CACHE_METHODS
from dit_optimum.techniques.registry import TECHNIQUES, check_stack
from test_benchmark import tiny_settings

PATHS = ("fp32", "bf16")
BASES = ("baseline", "prune-depth-50-recover")


def test_the_space_is_every_legal_stack_of_declared_parts():
    candidates = search_space()
    names = [candidate.name for candidate in candidates]
    assert len(names) == len(set(names)) > 100
    for candidate in candidates:
        check_stack(candidate.stack())  # never an illegal stack
        if is_student(candidate.base):  # a student samples at its own steps: no solver on top
            assert candidate.solver is None
        if candidate.cache is not None:
            assert dict(candidate.cache)["method"] in SAVED_CACHE_METHODS and candidate.path in ("fp32", "bf16", "int8")
    bases = search_bases()
    # trained from scratch (minutes) or not a trained pipeline of its own: not a base unless already trained
    assert "attention-shallow" not in bases and "moe" not in bases and "optimized" not in bases
    assert {"baseline", "prune-depth-75-recover", "prune-depth-75-recover+distill-steps-1"} <= set(bases)
    assert "attention-shallow" in search_bases(trained=["attention-shallow"])
    assert {candidate.path for candidate in search_space(paths=["fp32"])} == {"fp32"}
    assert Candidate.from_dict(json.loads(json.dumps(candidates[7].to_dict()))) == candidates[7]


def test_the_budget_is_the_paired_test_in_the_metrics_own_units():
    worse = {"difference": -0.02, "interval": [-0.04, -0.005], "significant": True}
    unsure = {"difference": -0.01, "interval": [-0.03, 0.01], "significant": False}
    better_fd = {"difference": -5.0, "interval": [-9.0, -1.0], "significant": True}
    default = QualityBudget.parse(None)
    assert default.judge({"class_accuracy": unsure, "fd_domain": better_fd}, {})[0]
    accepted, why = default.judge({"class_accuracy": worse}, {})
    assert not accepted and "significantly worse" in why and "-2" in why
    # a maximum drop is judged at the worse end of the interval: 3 points lost is possible here
    points = QualityBudget.parse("class_accuracy=2")
    assert not points.judge({"class_accuracy": unsure}, {"class_accuracy": 0.97})[0]
    assert QualityBudget.parse({"class_accuracy": 3}).judge({"class_accuracy": unsure}, {"class_accuracy": 0.97})[0]
    # distances in percent of the baseline's value: +9 on 100 is within 10%, not within 5%
    fd = {"difference": 4.0, "interval": [-1.0, 9.0], "significant": False}
    assert QualityBudget.parse("fd_domain=10").judge({"fd_domain": fd}, {"fd_domain": 100.0})[0]
    assert not QualityBudget.parse("fd_domain=5").judge({"fd_domain": fd}, {"fd_domain": 100.0})[0]
    assert "FD_domain at most 10 % higher" in QualityBudget.parse("fd_domain=10").describe()
    for bad, message in (("accuracy=1", "Unknown metric 'accuracy'"), ("class_accuracy", "METRIC=DROP"),
                         ("fd_domain=-1", "finite number >= 0"), ("fd_domain=nan", "finite number")):  # fmt: skip
        with pytest.raises(DiTOptimumError, match=message):
            QualityBudget.parse(bad)


def test_search_settings_are_checked_naming_the_parameter():
    for settings, message in (
        (SearchSettings(target="speed"), "Unknown `target`='speed'; allowed values: sampling, latency, size, memory"),
        (SearchSettings(time_budget=float("nan")), "`time_budget`"),
        (SearchSettings(max_size=1.5), "`max_size`=1.5"),
        (SearchSettings(screen_samples=-1), "`screen_samples`"),
        (SearchSettings(slack=0.5), "`slack`"),
    ):
        with pytest.raises(DiTOptimumError, match=message.replace("(", r"\(").replace(")", r"\)")):
            settings.validate()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny trained DiT-XS/4 baseline on 8x8 digits, the benchmark settings it was trained with, and scorers."""
    folder = tmp_path_factory.mktemp("optimize")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIT_OPTIMUM_CACHE", str(folder / "cache"))
        settings = tiny_settings(folder / "bench", ("baseline",))
        settings.quality = replace(settings.quality, num_samples=20, metrics=("class_accuracy", "kid"))
        baseline = VariantContext(settings, "DiT-XS/4").baseline_path()
        classifier = domain_classifier(real_split("digits", "train", 40, 20), 8, ClassifierRecipe(epochs=1))
    return folder, settings, baseline, (TinyFeatureExtractor(), classifier)


def _optimize(tiny_run, output, monkeypatch, pipe=None, **options):
    folder, settings, baseline, (inception, classifier) = tiny_run
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(folder / "cache"))
    options = {"bases": BASES, "paths": PATHS, "time_budget": 300.0, "screen_samples": 10, **options}
    return optimize(pipe or baseline, "digits", output_dir=output, quality=settings.quality, speed=settings.speed,
                    training=settings.training, inception=inception, classifier=classifier, **options)  # fmt: skip


def test_optimize_writes_the_chosen_pipeline_card_report_and_log(tiny_run, tmp_path, monkeypatch):
    lines = []
    result = _optimize(tiny_run, tmp_path / "out", monkeypatch, echo=lines.append)
    out = tmp_path / "out"
    log = read_json_file(out / "search.json", SEARCH_LOG)
    assert log["chosen"] == result.search.candidate.name and log["stopped"] == result.search.stopped
    tried = [record["name"] for record in log["candidates"]]
    assert tried == [record["name"] for record in result.search.records] and len(tried) >= 1
    for record in log["candidates"]:  # every candidate says how far it got and why
        assert record["status"] in ("kept", "dropped", "failed") and record["reason"]
        assert Candidate.from_dict(record["candidate"]).base in BASES
        if record["stage"] == "full":
            assert record["quality"]["num_samples"] == 20 and "verdict" in record["quality"]
    # the row is the benchmark's: quality with N and intervals, paired verdict, speed against the baseline
    row = result.row
    assert row["technique"] == "optimized" and row["num_samples"] == 20 and row["quality_verdict"]
    assert set(row["vs_baseline"]) == {"class_accuracy", "kid"} and len(row["sampling_speedup_range"]) == 2
    assert row["optimize"]["chosen"] == result.search.candidate.name
    read_json_file(out / "results.json", RESULTS)
    report = (out / "report.md").read_text()
    assert all(f"`{name}`" in report for name in tried) and "## Candidates tried" in report
    assert result.search.budget.describe() in report
    card = (out / "pipeline" / "README.md").read_text()
    assert "optimized" in card and "dit-optimum" in card
    # loaded with no other argument, the pipeline samples as it was judged (steps and guidance recorded)
    loaded = DiTOptimumPipeline.from_pretrained(out / "pipeline")
    judged = row["quality_settings"]
    assert loaded.sampling_defaults == {
        "num_inference_steps": judged["num_inference_steps"],
        "guidance_scale": judged["guidance_scale"],
    }
    assert any("chosen:" in line for line in lines)


def test_the_cards_loading_line_runs_in_a_fresh_process(tiny_run, tmp_path, monkeypatch):
    result = _optimize(tiny_run, tmp_path / "out", monkeypatch)
    card = (result.pipeline_dir / "README.md").read_text()
    code = (
        card.split("```python\n", 1)[1]
        .split("```", 1)[0]
        .replace("dit-optimum/dit-optimized", str(result.pipeline_dir))
    )
    code = code.replace('images[0].save("sample.png")', "print(len(images))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("4")


def test_a_killed_search_resumes_where_it_stopped(tiny_run, tmp_path, monkeypatch):
    original = search_module._try
    calls = []

    def dies_on_the_second(candidate, *args, **kwargs):
        calls.append(candidate.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(candidate, *args, **kwargs)

    monkeypatch.setattr(search_module, "_try", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _optimize(tiny_run, tmp_path / "out", monkeypatch)
    first = read_json_file(tmp_path / "out" / "search.json", SEARCH_LOG)["candidates"]
    assert [record["name"] for record in first] == calls[:1]
    calls.clear()
    monkeypatch.setattr(
        search_module, "_try", lambda candidate, *a, **k: calls.append(candidate.name) or original(candidate, *a, **k)
    )
    result = _optimize(tiny_run, tmp_path / "out", monkeypatch)
    names = [record["name"] for record in result.search.records]
    assert names[0] == first[0]["name"] and first[0]["name"] not in calls  # tried once, kept from the log
    assert names[1:] == calls
    # a third run has nothing left to try: the same choice from the log alone
    calls.clear()
    again = _optimize(tiny_run, tmp_path / "out", monkeypatch)
    assert calls == [] and again.search.candidate == result.search.candidate


def test_time_budget_and_size_limit_bound_the_search(tiny_run, tmp_path, monkeypatch):
    nothing = _optimize(tiny_run, tmp_path / "none", monkeypatch, time_budget=0.0)
    assert nothing.search.candidate.name == "baseline" and "time budget" in nothing.search.stopped
    assert nothing.search.records == []
    small = _optimize(tiny_run, tmp_path / "small", monkeypatch, max_size=0.3)
    # fp32 weights of an unpruned model are over 30% of the baseline's size: never tried, counted
    assert all(r["candidate"]["path"] != "fp32" or r["candidate"]["base"] != "baseline" for r in small.search.records)
    assert small.search.space["over_size_limit"] >= 10 and small.search.space["legal"] > len(small.search.records)
    assert small.row["size_bytes"] <= 0.3 * small.search.baseline["size_bytes"]
    report = (tmp_path / "small" / "report.md").read_text()
    assert f"{small.search.space['over_size_limit']} of them over the size limit" in report
    # nothing within the size limit: an error naming it, never the full-size baseline shipped as if it fitted
    with pytest.raises(DiTOptimumError, match=r"No pipeline within `max_size`=1e-06 .* the baseline itself is 100%"):
        _optimize(tiny_run, tmp_path / "tiny", monkeypatch, max_size=1e-6)
    assert not (tmp_path / "tiny" / "pipeline").exists() and (tmp_path / "tiny" / "search.json").is_file()


def test_the_benchmarks_optimized_row_searches_the_runs_own_cells(tiny_run, tmp_path, monkeypatch):
    folder, settings, baseline, (inception, classifier) = tiny_run
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(folder / "cache"))
    technique = TECHNIQUES["optimized"]
    options = {**technique.options, "bases": list(BASES), "paths": list(PATHS)}
    monkeypatch.setitem(TECHNIQUES, "optimized", replace(technique, options=options))
    bench = replace(settings, output_dir=str(tmp_path / "bench"), techniques=("baseline", "optimized"),
                    pretrained={"DiT-XS/4": baseline})  # fmt: skip
    rows = run_benchmark(bench, inception=inception, classifier=classifier)
    row = {r["technique"]: r for r in rows}["optimized"]
    assert row["status"] == "ok", row.get("error")
    assert row["optimize"]["report"] == "optimize/DiT-XS-4/report.md" and row["quality_verdict"]
    assert (tmp_path / "bench" / "optimize" / "DiT-XS-4" / "report.md").is_file()
    assert row["optimize"]["candidates_tried"] == len(
        read_json_file(tmp_path / "bench" / "optimize" / "DiT-XS-4" / "search.json", SEARCH_LOG)["candidates"]
    )
    report = write_report(rows, tmp_path / "bench").read_text()
    assert "## The optimizer's choice" in report and f"chose **{row['optimize']['chosen']}**" in report


def test_the_command_line_refuses_bad_options_before_any_work(tmp_path, capsys):
    for arguments, message in (
        (["--budget", "accuracy=1"], "Unknown metric 'accuracy'"),
        (["--target", "speed"], "Unknown `target`='speed'"),
        (["--max-size", "2"], "`max_size`=2.0"),
    ):
        code = main(["optimize", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"), *arguments])
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_pipeline_of_no_preset_is_refused_naming_the_presets(tmp_path):
    from conftest import tiny_pixel_pipeline

    with pytest.raises(DiTOptimumError, match=r"is not a DiT preset.*DiT-XS/4"):
        optimize(tiny_pixel_pipeline(), output_dir=tmp_path / "o")


def test_restricting_the_space_names_what_is_allowed():
    allowed = r"`bases`=\[.moe-x.\] must name some of, each once: baseline, attention-gqa, .*prune-depth-75-recover"
    with pytest.raises(DiTOptimumError, match=allowed):
        SearchSettings(bases=("moe-x",)).validate()
    with pytest.raises(DiTOptimumError, match=r"`paths`=\[\] must name some of, each once: fp32, bf16, int8"):
        SearchSettings(paths=()).validate()
    SearchSettings(bases=("baseline", "moe"), paths=("fp32",)).validate()  # from scratch when named: allowed


def test_within_the_timing_noise_the_smaller_pipeline_wins():
    def record(name, score, span, size):
        return {"name": name, "score": score, "cost": {"sampling_speedup_range": span, "size_bytes": size}}

    runtime_bf16 = record("a+openvino", 45.9, [43.5, 46.0], 21_000_000)
    runtime_int8 = record("a+openvino-int8", 45.6, [44.1, 46.1], 13_000_000)
    assert beats(runtime_int8, runtime_bf16, "sampling") and not beats(runtime_bf16, runtime_int8, "sampling")
    clearly_faster = record("b", 60.0, [58.0, 61.0], 30_000_000)
    assert beats(clearly_faster, runtime_int8, "sampling")
    baseline = {"name": "baseline", "score": 1.0, "cost": {"size_bytes": 1}}
    assert beats(runtime_bf16, baseline, "sampling")


def test_a_cost_only_run_of_the_default_preset_leaves_the_search_out(tmp_path):
    from dit_optimum.benchmark.settings import DEFAULT_TECHNIQUES, settings_from_arguments
    from dit_optimum.cli import build_parser

    def parsed(*options):
        return settings_from_arguments(
            build_parser().parse_args(["benchmark", "--output-dir", str(tmp_path), *options])
        )

    assert "optimized" in DEFAULT_TECHNIQUES and "optimized" in parsed().techniques
    assert parsed("--speed-only").techniques == tuple(t for t in DEFAULT_TECHNIQUES if t != "optimized")
    assert parsed("--speed-only", "--techniques", "baseline,optimized").techniques == ("baseline", "optimized")


def test_the_cards_line_follows_the_chosen_stack_and_renders_nothing_else_of_it():
    from dit_optimum.hub.cards import loading_code

    row = {"technique": "optimized", "dtype": "float32", "optimize": {"stack": {"base": "baseline", "path": "int8"}}}
    assert "torch_dtype=torch.float32" in loading_code("org/dit", row)  # torchao: the dtype is always named
    saved = {**row, "optimize": {"stack": {"base": "baseline", "path": "fp32", "cache": {"method": "block-schedule"}}}}
    assert "block reuse schedule is saved with the model" in loading_code("org/dit", saved)
    hostile = {"technique": "optimized", "optimize": {"stack": {"path": "__import__('os')", "cache": {
        "method": "taylorseer", "cache_interval": "__import__('os').system('x')"}}}}  # fmt: skip
    code = loading_code("org/dit", hostile)
    assert "__import__" not in code and "enable_step_cache" not in code


def test_a_release_of_the_optimized_cell_rebuilds_the_recorded_stack_without_searching(tiny_run, tmp_path, monkeypatch):
    from dit_optimum.hub import release

    folder, settings, baseline, (inception, classifier) = tiny_run
    monkeypatch.setenv("DIT_OPTIMUM_CACHE", str(folder / "cache"))
    technique = TECHNIQUES["optimized"]
    options = {**technique.options, "bases": ["baseline"], "paths": list(PATHS), "max_size": None}
    monkeypatch.setitem(TECHNIQUES, "optimized", replace(technique, options=options))
    bench = replace(settings, output_dir=str(tmp_path / "bench"), techniques=("baseline", "optimized"),
                    pretrained={"DiT-XS/4": baseline})  # fmt: skip
    rows = run_benchmark(bench, inception=inception, classifier=classifier)
    row = {r["technique"]: r for r in rows}["optimized"]
    from dit_optimum.optimizer import technique as technique_module

    monkeypatch.setattr(technique_module, "run_search", lambda *a, **k: pytest.fail("a release must not search"))
    released = release(tmp_path / "bench", "org", tmp_path / "releases", techniques=["optimized"])
    loaded = DiTOptimumPipeline.from_pretrained(released[0].folder)
    assert loaded.sampling_defaults["num_inference_steps"] == row["sampling_steps"]
    assert "optimized" in (released[0].folder / "README.md").read_text()


def test_the_output_never_overwrites_the_baseline_or_a_users_pipeline(tiny_run, tmp_path, monkeypatch):
    baseline = tiny_run[2]
    inside = tmp_path / "out" / "pipeline"
    shutil.copytree(baseline, inside)
    with pytest.raises(DiTOptimumError, match="overlap: the result would be written over or into the baseline"):
        _optimize(tiny_run, tmp_path / "out", monkeypatch, pipe=inside)
    foreign = tmp_path / "other"
    shutil.copytree(baseline, foreign / "pipeline")
    (foreign / "pipeline" / ".dit_optimum.manifest.json").unlink(missing_ok=True)
    before = (foreign / "pipeline" / "model_index.json").read_bytes()
    with pytest.raises(DiTOptimumError, match="holds a pipeline/ folder that dit-optimum did not write"):
        _optimize(tiny_run, foreign, monkeypatch)
    assert (foreign / "pipeline" / "model_index.json").read_bytes() == before
    with pytest.raises(DiTOptimumError, match="repo_id"):  # checked before any work
        _optimize(tiny_run, tmp_path / "bad", monkeypatch, repo_id="my repo!!")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DiTOptimumError, match="names 'class_accuracy' twice"):
        QualityBudget.parse("class_accuracy=1,class_accuracy=2")


def test_a_hand_edited_or_foreign_log_is_refused_or_not_reused(tiny_run, tmp_path, monkeypatch, caplog):
    result = _optimize(tiny_run, tmp_path / "out", monkeypatch)
    log_path = tmp_path / "out" / "search.json"
    log = json.loads(log_path.read_text())
    kept = next(record for record in log["candidates"] if record["status"] == "kept")
    kept["candidate"]["path"] = "openvino"  # a stack this search does not allow, shipped if trusted
    log_path.write_text(json.dumps(log))
    with pytest.raises(DiTOptimumError, match=r"search log .* is damaged .*name is not its stack's"):
        _optimize(tiny_run, tmp_path / "out", monkeypatch)
    kept["candidate"]["path"], kept["cost"] = "fp32", [1]
    log_path.write_text(json.dumps(log))
    with pytest.raises(DiTOptimumError, match="is damaged"):
        _optimize(tiny_run, tmp_path / "out", monkeypatch)
    assert result.search.records
    # the same path with other weights: a new search, not the old one's records
    baseline = tiny_run[2]
    moved = tmp_path / "moved"
    shutil.copytree(baseline, moved)
    first = _optimize(tiny_run, tmp_path / "again", monkeypatch, pipe=moved)
    pipeline = DiTOptimumPipeline.from_pretrained(moved)
    with torch.no_grad():
        next(pipeline.transformer.parameters()).add_(0.01)
    pipeline.save_pretrained(moved)
    calls = []
    original = search_module._try
    monkeypatch.setattr(search_module, "_try", lambda c, *a, **k: calls.append(c.name) or original(c, *a, **k))
    with caplog.at_level("WARNING", logger="dit_optimum.optimizer.search"):
        _optimize(tiny_run, tmp_path / "again", monkeypatch, pipe=moved)
    assert calls and first.search.records
    assert "log of another search (its baseline_sha256 differ)" in caplog.text


def test_api_type_mistakes_and_share_intervals():
    from dit_optimum.evaluation.declarations import get_metric
    from dit_optimum.evaluation.quality import _within_range

    with pytest.raises(DiTOptimumError, match=r"`bases`='baseline' must name some of"):
        SearchSettings(bases="baseline").validate()
    with pytest.raises(DiTOptimumError, match="Unknown `target`"):
        SearchSettings(target=["sampling"]).validate()
    # an accuracy's re-centred bootstrap range near 100% stays a share; a distance's change is left alone
    assert _within_range(get_metric("class_accuracy"), (0.965, 1.003)) == [0.965, 1.0]
    assert _within_range(get_metric("fd_domain"), (-1.0, 3.0)) == [-1.0, 3.0]
