"""Reader studies: radiologists tell real from synthetic radiographs in a browser, blinded and randomised.

- :mod:`study.create`      set-up: real images from a data set reader, synthetic ones from an archive or
                           a bundle, one served encoding, a seeded case order per reader
- :mod:`study.storage`     SQLAlchemy models and Alembic migrations (SQLite or any SQLAlchemy URL)
- :mod:`study.app`         the Starlette reader and admin app (torch-free)
- :mod:`study.statistics`  accuracy, exact tests, sensitivity/specificity, ROC AUC, kappas, per finding
- :mod:`study.report`      CSV exports and the HTML report with plots
- :mod:`study.scripted`    a scripted reader that answers over HTTP, for tests and the worked example
- ``python -m study``      the command line (create, serve, close, report, migrate)

See docs/reader-study.md.
"""
