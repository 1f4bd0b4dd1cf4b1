"""Evaluation on real data: datasets, tasks, baselines and reports.

- :mod:`.datasets`: adapters for labelled 2D folders (ISIC, chest X-ray protocol, images/ + masks/) and 3D folders
  (MSD, images/ + labels/, BraTS case folders), with what a class / structure is and each set's slice axis.
- :mod:`.episodes`: the seeded episodes of the three tasks (``images``, ``slices``, ``transfer``).
- :mod:`.metrics`: Dice, HD95 (mm), confusion counts via MONAI; pooled IoU, false-positive slices, Dice by distance.
- :mod:`.baselines`: copy and SimpleITK registration baselines; :mod:`.methods`: ``copy`` / ``registration`` /
  ``ours`` behind one interface.
- :mod:`.tasks`: run and summarise one task's episodes; :mod:`.store`: finished episodes for resuming;
  :mod:`.report`: results.json / results.md / PNG plots and :func:`~.report.compare_reports`.
- :func:`.run.run_evaluation`: one task x one data set x one method -> a report folder (``insid3-med evaluate``).
"""
