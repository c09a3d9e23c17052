"""IndivAID: individual animal re-identification with CLIP."""
