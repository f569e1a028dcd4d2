"""The legacy v1 save/migration stream: a non-seeking sans-IO parser, a faithful writer, a save engine."""
