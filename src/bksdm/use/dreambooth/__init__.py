"""DreamBooth on any SD-v1/v2 pipeline, bksdm students included: settings, subject data, recipe, metrics."""
