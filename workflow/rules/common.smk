# Paths of run files and job parameters, shared by every rule file.

RUNS_DIR = "results/runs"
RUN_FILES = ("run.json", "history.csv", "grad_norms.csv", "model.pt")


def run_file(run_id, name="run.json"):
    return f"{RUNS_DIR}/{run_id}/{name}"


def experiment_run_files(experiment, name="run.json"):
    return [run_file(run_id, name) for run_id in STUDY.experiments[experiment].run_ids]


def subset_args(subset):
    names = ("train_per_class", "val_per_class", "test_per_class")
    return " ".join(f"--{name.replace('_', '-')} {subset[name]}" for name in names if subset.get(name) is not None)


def sorted_mapping(value):
    if isinstance(value, dict):
        return {key: sorted_mapping(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [sorted_mapping(item) for item in value]
    return value


def run_settings_json(wildcards):
    # Sorted keys give the same string whatever the key order of the config,
    # so Snakemake's params trigger reruns a run only when a setting changes.
    run = STUDY.runs[wildcards.run_id]
    return json.dumps({"model": run.model, **run.settings}, sort_keys=True)


# The modules that draw figures, write tables and build the report. Aggregation
# rules list them as inputs and their digest as a param, so that editing
# plotting code rebuilds figures, tables and the report and never retrains a
# run. The digest is what triggers the rebuild: Snakemake 9.27 did not rerun
# these rules for a newer module file alone.
AGGREGATION_CODE = [
    str(Path(cifar_study.__file__).with_name(name)) for name in ("figures.py", "tables.py", "report.py")
]
AGGREGATION_CODE_DIGEST = hashlib.sha256(b"".join(Path(path).read_bytes() for path in AGGREGATION_CODE)).hexdigest()
