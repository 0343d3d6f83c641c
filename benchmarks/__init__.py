"""The benchmark scripts (not part of the installed package). A regular package, so that
``PYTHONPATH=. python benchmarks/<script>.py`` imports ``benchmarks.common`` from here even when another
distribution installs a top-level ``benchmarks`` package into site-packages (opacus 1.6 does)."""
