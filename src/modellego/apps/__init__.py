"""Applications built on the pipeline: decision routes (`apps.routes`), knowledge amalgamation and
distillation (`apps.amalgamate`)."""
