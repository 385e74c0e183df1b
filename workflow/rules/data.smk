# Decode CIFAR-10 once; every training job loads the tensors written here.


def subset_args(subset):
    names = ("train_per_class", "val_per_class", "test_per_class")
    return " ".join(f"--{name.replace('_', '-')} {subset[name]}" for name in names if subset.get(name) is not None)


rule prepare_data:
    output:
        data="results/data/cifar10.pt",
        summary="results/data/cifar10.json",
    log:
        "results/logs/prepare_data.log",
    params:
        root=config["data"]["root"],
        split_seed=config["data"]["split_seed"],
        val_size=config["data"]["val_size"],
        subset=subset_args(config["data"]["subset"]),
        download="" if config["data"]["download"] else "--no-download",
        python=sys.executable,
    localrule: True
    shell:
        "{params.python} -m cifar_study.data --root {params.root:q} --out results/data"
        " --split-seed {params.split_seed} --val-size {params.val_size} {params.subset}"
        " {params.download} --log {log}"
