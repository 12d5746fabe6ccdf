"""`mimflow sweep`: does domain pretraining pay on this data, at how many labels, with which backbone?

Pure pieces the sweep stage (pipeline/stages/sweep.py) puts together:
    config.py      the `sweep:` config section
    grid.py        arms (initialisation x head, and the baselines), repeated group-aware splits,
                   nested stratified label subsets, the trials they make
    classical.py   per-channel summary statistics and the scikit-learn baselines on them
    statistics.py  hierarchical bootstrap intervals, paired differences, minimum detectable effect
    report.py      results.csv, report.md, label_efficiency.png
    executors.py   trials one after another, or as Ray tasks; the progress line
"""
