"""Applications built on the pipeline: decision routes (`apps.routes`)."""
