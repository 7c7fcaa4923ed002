"""What the VTAB and DreamBooth trainers share: asset paths, checkpoints, the learning-rate schedule, metrics files
and the table of methods."""
