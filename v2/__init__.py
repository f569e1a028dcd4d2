"""The v2/v3 migration stream: records, sans-IO reader, writer, strict verifier, and native engines."""
