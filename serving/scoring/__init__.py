"""The scoring wing: ``python -m serving.score`` turns Parquet rows into scores through an export folder.

A row's way, one module after the other (pyproject.toml's contracts keep the imports pointing down it):

    cli.py          main parses and finds the model and its config; run(cfg, model, inputs, output, ...)
    plan.py         the input files, checked up front, planned into units of whole row groups
    engines.py      where units run: this process, worker processes; ray_engine.py: Ray actors
    worker.py       one unit's rows, chunk by chunk (serving.chunk_rows), into its files, then its marker
    scorer.py       route scenarios, tokenize, group, batches of serving.batch_size, calibrate
    model.py        one model holding every scenario's merged weights; the forward
    outputs.py      the output folder: unit files, quarantine, markers, resume

table.py scores a canonical table in memory; pyfunc_model.py is the registered model's MLflow pyfunc.
"""
