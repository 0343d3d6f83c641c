"""Tabular anomaly detection around the detectors in :mod:`oodscope.detectors.anomaly`: the ADBench data sets that
ship with scikit-learn, the DTE and ADBench protocols, and decision tools (contamination, rejection, EAP)."""
