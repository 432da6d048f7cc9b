// Package examples ships twind's example rules, for fridges, cars and
// indoor planters, as the JSON bodies of RuleService.CreateRule requests
// (the form grpcurl takes).
package examples

import "embed"

// FS holds the example rules, one CreateRuleRequest per *.json file.
//
//go:embed *.json
var FS embed.FS
