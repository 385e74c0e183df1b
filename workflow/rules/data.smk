# Decode CIFAR-10 once; every training job loads the tensors written here.


rule prepare_data:
    output:
        data="results/data/cifar10.pt",
        summary="results/data/cifar10.json",
    log:
        "results/logs/prepare_data.log",
    params:
        # The resolved path, so that a trailing slash or a symbolic link to the
        # same folder is no change of params and reruns nothing.
        root=os.path.realpath(config["data"]["root"]),
        split_seed=config["data"]["split_seed"],
        val_size=config["data"]["val_size"],
        subset=subset_args(config["data"]["subset"]),
        download="" if config["data"]["download"] else "--no-download",
    localrule: True
    conda:
        "../../environment.yml"
    shell:
        "python -m cifar_study.data --root {params.root:q} --out results/data"
        " --split-seed {params.split_seed} --val-size {params.val_size} {params.subset}"
        " {params.download} --log {log}"
