package twin

import (
	"github.com/cockroachdb/pebble/v2"
)

// API keys made through the operator API are stored as opaque blobs under
// k/<name>, outside the virtual shards; the server package owns their
// format (it stores only a key's hash, never the key).
var prefixAPIKeys = []byte("k/")

// PutAPIKey durably stores an API key record under its name.
func (e *Engine) PutAPIKey(name string, record []byte) error {
	if err := e.err(); err != nil {
		return err
	}
	b := e.db.NewBatch()
	if err := b.Set(append(append([]byte(nil), prefixAPIKeys...), name...), record, nil); err != nil {
		b.Close()
		return err
	}
	return e.commitDirect(b)
}

// DeleteAPIKey durably deletes an API key record.
func (e *Engine) DeleteAPIKey(name string) error {
	if err := e.err(); err != nil {
		return err
	}
	b := e.db.NewBatch()
	if err := b.Delete(append(append([]byte(nil), prefixAPIKeys...), name...), nil); err != nil {
		b.Close()
		return err
	}
	return e.commitDirect(b)
}

// APIKeys returns every stored API key record, by name.
func (e *Engine) APIKeys() (map[string][]byte, error) {
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: prefixAPIKeys, UpperBound: prefixEnd(prefixAPIKeys)})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	out := map[string][]byte{}
	for it.First(); it.Valid(); it.Next() {
		out[string(it.Key()[len(prefixAPIKeys):])] = append([]byte(nil), it.Value()...)
	}
	return out, it.Error()
}
