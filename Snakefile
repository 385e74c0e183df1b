# cifar-study: trains an MLP, ResNet18 and MLP-Mixer on CIFAR-10 across the
# sweeps of config.yaml and compiles the results into results/report/report.pdf.
#
#   snakemake --cores all                                   # the full study (GPU scale)
#   snakemake --cores all --configfile presets/quick.yaml   # CPU scale
#   snakemake --cores all results/figures/mlp_activation_curves.pdf

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

import cifar_study
from cifar_study.config import build_study

min_version("9.0")


configfile: "config.yaml"


envvars:
    "PATH",


validate(config, "workflow/schemas/config.schema.yaml")
STUDY = build_study(config)

# Jobs run `python -m cifar_study...`. Putting the folder of the interpreter
# that runs Snakemake, which has cifar_study installed, first on PATH lets
# them find it without an activated environment; SLURM jobs inherit PATH.
search_path = os.environ["PATH"]
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{search_path}"

wildcard_constraints:
    run_id="|".join(re.escape(run_id) for run_id in STUDY.runs),
    experiment="|".join(STUDY.experiments),


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        [run_file(run_id, name) for run_id in STUDY.runs for name in RUN_FILES],
        "results/report/report.pdf",
    default_target: True
