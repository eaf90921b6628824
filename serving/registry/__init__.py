"""The one home of the MLflow model registry's code.

    register.py     an export folder logged as a pyfunc and registered as a new model version
    cache.py        a model reference (folder, object-store URI, models:/name@alias) -> a checked local copy
    aliases.py      aliases (champion, previous), decision tags and version descriptions (promotion)
    lease.py        one promotion (or rollback) of a registered model at a time: a lease kept in the registry
"""
