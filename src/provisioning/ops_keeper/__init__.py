"""The ops keeper: the policy gate every operation request passes (approve, reject, or park it
for approval), with change freezes that reject matching operations whatever the policy says."""
