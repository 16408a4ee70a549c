"""model: loading models, the embedded model, what capture needs to know about a model, the logit lens."""
