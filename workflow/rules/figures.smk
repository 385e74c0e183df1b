# Figures: one rule per figure, each reading only the run files it draws and
# writing a PDF (for the report) and a PNG. Every figure is a target of its own:
#   snakemake --cores 1 results/figures/resnet18_lr_curves.pdf

from cifar_study.report import plan_report

# What the report shows for this configuration, read by report.smk too.
# The commands read each run's folder from the run.json given as --runs.
REPORT = plan_report(config, STUDY)


rule curves:
    input:
        code=AGGREGATION_CODE,
        runs=lambda wildcards: experiment_run_files(wildcards.experiment, "run.json"),
        histories=lambda wildcards: experiment_run_files(wildcards.experiment, "history.csv"),
    output:
        pdf="results/figures/{experiment}_curves.pdf",
        png=report(
            "results/figures/{experiment}_curves.png",
            caption="../../report/captions/curves.rst",
            category="Learning curves",
            labels={"experiment": "{experiment}"},
        ),
    log:
        "results/logs/figures/{experiment}_curves.log",
    params:
        code_digest=AGGREGATION_CODE_DIGEST,
        sweep_keys=lambda wildcards: STUDY.experiments[wildcards.experiment].sweep_keys,
        title=lambda wildcards: STUDY.experiments[wildcards.experiment].title,
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m cifar_study.figures curves --title {params.title:q} --sweep-keys {params.sweep_keys:q}"
        " --runs {input.runs:q} --pdf {output.pdf:q} --png {output.png:q} --log {log:q}"


if REPORT.kernels_experiment:

    rule conv1_kernels:
        input:
            code=AGGREGATION_CODE,
            runs=experiment_run_files(REPORT.kernels_experiment, "run.json"),
            models=experiment_run_files(REPORT.kernels_experiment, "model.pt"),
        output:
            pdf=REPORT.kernels_figure("pdf"),
            png=report(
                REPORT.kernels_figure("png"),
                caption="../../report/captions/conv1_kernels.rst",
                category="Weights",
            ),
        log:
            "results/logs/figures/conv1_kernels.log",
        params:
            code_digest=AGGREGATION_CODE_DIGEST,
            experiment=REPORT.kernels_experiment,
            sweep_keys=STUDY.experiments[REPORT.kernels_experiment].sweep_keys,
        localrule: True
        conda:
            "../../environment.yml"
        shell:
            "python -m cifar_study.figures kernels --sweep-keys {params.sweep_keys:q}"
            " --runs {input.runs:q} --pdf {output.pdf:q} --png {output.png:q} --log {log:q}"


if REPORT.token_mixing_experiment:

    rule token_mixing:
        input:
            code=AGGREGATION_CODE,
            runs=experiment_run_files(REPORT.token_mixing_experiment, "run.json"),
            models=experiment_run_files(REPORT.token_mixing_experiment, "model.pt"),
        output:
            # One file per page of 64 hidden units.
            pdf=REPORT.token_mixing_figures("pdf"),
            png=[
                report(path, caption="../../report/captions/token_mixing.rst", category="Weights")
                for path in REPORT.token_mixing_figures("png")
            ],
        log:
            "results/logs/figures/token_mixing.log",
        params:
            code_digest=AGGREGATION_CODE_DIGEST,
            experiment=REPORT.token_mixing_experiment,
            sweep_keys=STUDY.experiments[REPORT.token_mixing_experiment].sweep_keys,
        localrule: True
        conda:
            "../../environment.yml"
        shell:
            "python -m cifar_study.figures token-mixing --sweep-keys {params.sweep_keys:q}"
            " --runs {input.runs:q} --pdf {output.pdf:q} --png {output.png:q} --log {log:q}"


rule gradient_flow:
    input:
        code=AGGREGATION_CODE,
        runs=lambda wildcards: experiment_run_files(REPORT.gradient_flow[wildcards.model], "run.json"),
        grad_norms=lambda wildcards: experiment_run_files(REPORT.gradient_flow[wildcards.model], "grad_norms.csv"),
    output:
        pdf="results/figures/gradient_flow_{model}.pdf",
        png=report(
            "results/figures/gradient_flow_{model}.png",
            caption="../../report/captions/gradient_flow.rst",
            category="Gradient flow",
            labels={"model": "{model}"},
        ),
    log:
        "results/logs/figures/gradient_flow_{model}.log",
    wildcard_constraints:
        model="|".join(REPORT.gradient_flow),
    params:
        code_digest=AGGREGATION_CODE_DIGEST,
        # The best run of the model's first experiment; the figure title names it.
        experiment=lambda wildcards: REPORT.gradient_flow[wildcards.model],
        sweep_keys=lambda wildcards: STUDY.experiments[REPORT.gradient_flow[wildcards.model]].sweep_keys,
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m cifar_study.figures gradient-flow --model {wildcards.model} --experiment {params.experiment}"
        " --sweep-keys {params.sweep_keys:q} --runs {input.runs:q} --pdf {output.pdf:q} --png {output.png:q}"
        " --log {log:q}"
