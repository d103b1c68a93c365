"""Demo and test data: the Regal point-of-sale database the demo backs up (datagen). Not part of the engine,
which never imports it."""
