"""Fixed (non-searched) models: the HigherHRNet-W32 teacher and PNFS top-down networks."""
