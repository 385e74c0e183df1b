# One job per run of the study; its files in results/runs/<run-id>/ are the
# contract with every later stage.

TRAIN_RESOURCES = config["resources"]["train"]


rule train:
    input:
        data=rules.prepare_data.output.data,
        summary=rules.prepare_data.output.summary,
    output:
        **{name.split(".")[0]: run_file("{run_id}", name) for name in RUN_FILES},
    log:
        run_file("{run_id}", "train.log"),
    params:
        settings=run_settings_json,
        out_dir=lambda wildcards: f"{RUNS_DIR}/{wildcards.run_id}",
    threads: TRAIN_RESOURCES["threads"]
    resources:
        mem_mb=TRAIN_RESOURCES["mem_mb"],
        runtime=TRAIN_RESOURCES["runtime"],
        gpu=TRAIN_RESOURCES["gpu"],
    conda:
        "../../environment.yml"
    shell:
        "python -m cifar_study.train --run-id {wildcards.run_id:q} --settings {params.settings:q}"
        " --data {input.data:q} --out {params.out_dir:q} --threads {threads} --log {log:q}"
