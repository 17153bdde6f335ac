"""L-infinity attacks: the white-box PGD family shared by training and evaluation, and AutoAttack."""
