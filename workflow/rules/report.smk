# Tables, the numbers the report quotes, and the compiled report. Every table
# is a target of its own (results/tables/<experiment>.csv and .tex); the PDF is
#   snakemake --cores 2 results/report/report.pdf
# Uses REPORT of figures.smk, which is included first.

# The parts of the configuration the report reads; data.root and resources
# stay out, so pointing the pipeline at another copy of the data reruns nothing.
# Mappings are written with sorted keys, so that reordering the config file
# reruns nothing, except experiments, whose order is the report's order.
REPORT_CONFIG = json.dumps(
    {
        "data": sorted_mapping({k: v for k, v in config["data"].items() if k not in ("root", "download")}),
        "defaults": sorted_mapping(config.get("defaults")),
        "models": sorted_mapping(config.get("models")),
        "experiments": {eid: sorted_mapping(spec) for eid, spec in config["experiments"].items()},
        "report": sorted_mapping(config.get("report")),
    }
)


ruleorder: runs_table > experiment_table


rule experiment_table:
    input:
        code=AGGREGATION_CODE,
        runs=lambda wildcards: experiment_run_files(wildcards.experiment, "run.json"),
        histories=lambda wildcards: experiment_run_files(wildcards.experiment, "history.csv"),
    output:
        csv=report(
            "results/tables/{experiment}.csv",
            caption="../../report/captions/experiment_table.rst",
            category="Tables",
            labels={"experiment": "{experiment}"},
        ),
        tex="results/tables/{experiment}.tex",
    log:
        "results/logs/tables/{experiment}.log",
    params:
        code_digest=AGGREGATION_CODE_DIGEST,
        sweep_keys=lambda wildcards: STUDY.experiments[wildcards.experiment].sweep_keys,
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m cifar_study.tables experiment --experiment {wildcards.experiment}"
        " --sweep-keys {params.sweep_keys:q} --runs {input.runs:q} --csv {output.csv:q} --tex {output.tex:q}"
        " --log {log:q}"


rule runs_table:
    input:
        code=AGGREGATION_CODE,
        runs=[run_file(run_id, "run.json") for run_id in STUDY.runs],
        histories=[run_file(run_id, "history.csv") for run_id in STUDY.runs],
    output:
        csv=report(
            REPORT.runs_table("csv"),
            caption="../../report/captions/runs_table.rst",
            category="Tables",
            labels={"experiment": "all runs"},
        ),
        tex=REPORT.runs_table("tex"),
    log:
        "results/logs/tables/all_runs.log",
    params:
        code_digest=AGGREGATION_CODE_DIGEST,
        # A function, so that braces in titles are not read as wildcards.
        experiments=lambda wildcards: json.dumps(
            [{"id": e.experiment_id, "title": e.title, "run_ids": list(e.run_ids)} for e in STUDY.experiments.values()]
        ),
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m cifar_study.tables runs --experiments {params.experiments:q} --runs {input.runs:q}"
        " --csv {output.csv:q} --tex {output.tex:q} --log {log:q}"


rule report_numbers:
    input:
        code=AGGREGATION_CODE,
        runs=[run_file(run_id, "run.json") for run_id in STUDY.runs],
        histories=[run_file(run_id, "history.csv") for run_id in STUDY.runs],
        data=rules.prepare_data.output.summary,
    output:
        REPORT.fragment("numbers"),
    log:
        "results/logs/report/numbers.log",
    params:
        code_digest=AGGREGATION_CODE_DIGEST,
        # A function, so that braces in titles are not read as wildcards.
        config=lambda wildcards: REPORT_CONFIG,
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m cifar_study.report numbers --config-json {params.config:q} --runs {input.runs:q}"
        " --data-summary {input.data:q} --output {output:q} --log {log:q}"


rule report_fragments:
    input:
        code=AGGREGATION_CODE,
    output:
        setup=REPORT.fragment("setup"),
        experiments=REPORT.fragment("experiments"),
        token_mixing_figures=REPORT.fragment("token_mixing_figures"),
        gradient_flow_figures=REPORT.fragment("gradient_flow_figures"),
    log:
        "results/logs/report/fragments.log",
    params:
        code_digest=AGGREGATION_CODE_DIGEST,
        # A function, so that braces in titles are not read as wildcards.
        config=lambda wildcards: REPORT_CONFIG,
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m cifar_study.report fragments --config-json {params.config:q}"
        " --setup {output.setup:q} --experiments {output.experiments:q}"
        " --token-mixing-figures {output.token_mixing_figures:q} --gradient-flow-figures {output.gradient_flow_figures:q}"
        " --log {log:q}"


rule report:
    input:
        # Every file the document reads, so that a change to any of them rebuilds the PDF.
        REPORT.report_inputs("report"),
        code=AGGREGATION_CODE,
    output:
        report("results/report/report.pdf", caption="../../report/captions/report.rst", category="Report"),
    log:
        "results/logs/report/latexmk.log",
    params:
        code_digest=AGGREGATION_CODE_DIGEST,
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        # stdin closed: LaTeX must fail on an error, never wait for input.
        "python -m cifar_study.report build --source report --workdir results/report --log {log:q} < /dev/null"
