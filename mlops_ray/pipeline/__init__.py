"""The end-to-end job (train or tune -> evaluate -> promote -> deploy -> smoke) and the monitor
that restarts it when the production deployment drifts."""
