"""The security suite: authorization, body limits, fuzzing, injection, supply chain."""
