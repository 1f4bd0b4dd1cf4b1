"""Medical image I/O, intensity presets and geometry. No model code lives here."""
