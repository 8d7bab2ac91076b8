"""`cllm4rec report`: every model of one comparison on one dataset, once per seed, in one table with its
provenance (report.md, report.json; runs under REPORT_DIR/runs/<model>).

The config's recommender decides what is compared and how it is scored: its ``protocol`` (the recommender
registry, ``recommenders/__init__.py``) picks the module that runs and renders the report. Layout, each module
importing only the ones above it in this list:

* ``stats``: seed statistics (mean ± sample std), the seed-noise rule, provenance and Markdown helpers;
* ``runs``: a seed's config, a variant's config, fresh run folders, the settings key behind ``--reuse``;
* ``full_ranking``: Recall/NDCG@K over the whole catalogue: the baselines and the recommender's variants;
* ``candidates``: Hit/NDCG@K on a leave-one-out dataset's stored candidates: candidate baselines and the
  recommender's runs (with the rows each run reports);
* ``command``: the command line (``add_arguments`` / ``run``).
"""
