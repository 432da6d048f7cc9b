package rules

import (
	"encoding/json"
	"fmt"
)

// Restore stores and installs a rule definition as an export holds it (the
// JSON that PutRule received), keeping its generation, times and status, so
// that twins' rule states restored with it stay valid. A rule with the same
// id is refused with ErrExists unless replace is set. It returns the rule's
// id.
func (r *Registry) Restore(stored []byte, replace bool) (string, error) {
	var def Definition
	if err := json.Unmarshal(stored, &def); err != nil {
		return "", fmt.Errorf("%w: the rule definition is not the JSON an export holds: %v", ErrInvalid, err)
	}
	if def.ID == "" {
		return "", fmt.Errorf("%w: the rule definition has no id", ErrInvalid)
	}
	if def.Gen < 1 {
		def.Gen = 1
	}
	st := statusFrom(def.Status)
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.rules[def.ID]; ok && !replace {
		return def.ID, fmt.Errorf("%w: rule %q; import with upsert to replace it", ErrExists, def.ID)
	}
	if def.CreateTime.IsZero() {
		def.CreateTime = r.clock().UTC()
	}
	if def.UpdateTime.IsZero() {
		def.UpdateTime = def.CreateTime
	}
	_, err := r.putLocked(def, st)
	return def.ID, err
}
