package twin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
)

// The JSON values of store format 1, which twind wrote before issue 9.
// Open converts a store of format 1 once (convert.go); until the conversion
// finishes, and in `twind check`, the readers of storecodec.go read these
// too. The writers stay for tests, which build stores of format 1.

// encodeRecordJSON encodes a record in store format 1.
func encodeRecordJSON(r record) []byte {
	if r.Deleted {
		b := strconv.AppendInt([]byte(`{"deleted":true,"last_version":`), r.LastVersion, 10)
		b = strconv.AppendInt(append(b, `,"last_command_seq":`...), r.LastCommandSeq, 10)
		return append(b, '}')
	}
	return appendTwinJSON(nil, r.Twin)
}

func decodeRecordJSON(b []byte) (record, error) {
	if !bytes.HasPrefix(b, []byte(`{"deleted":`)) {
		// A live twin (encodeRecordJSON starts it with its id): one pass.
		t := new(Twin)
		if err := json.Unmarshal(b, t); err != nil {
			return record{}, fmt.Errorf("twin: corrupt record: %w", err)
		}
		return record{Twin: t}, nil
	}
	var probe struct {
		Deleted        bool  `json:"deleted"`
		LastVersion    int64 `json:"last_version"`
		LastCommandSeq int64 `json:"last_command_seq"`
	}
	if err := json.Unmarshal(b, &probe); err != nil {
		return record{}, fmt.Errorf("twin: corrupt record: %w", err)
	}
	if probe.Deleted {
		return record{Deleted: true, LastVersion: probe.LastVersion, LastCommandSeq: probe.LastCommandSeq}, nil
	}
	t := new(Twin)
	if err := json.Unmarshal(b, t); err != nil {
		return record{}, fmt.Errorf("twin: corrupt record: %w", err)
	}
	return record{Twin: t}, nil
}

func decodeEventJSON(b []byte) (*Event, error) {
	ev := new(Event)
	if err := json.Unmarshal(b, ev); err != nil {
		return nil, fmt.Errorf("twin: corrupt event: %w", err)
	}
	return ev, nil
}

func decodeEventHeadJSON(b []byte) (eventHead, error) {
	var ev struct {
		Revision int64     `json:"r"`
		Kind     EventKind `json:"k"`
		Twin     struct {
			ID      string `json:"id"`
			Version int64  `json:"version"`
		} `json:"tw"`
	}
	if err := json.Unmarshal(b, &ev); err != nil {
		return eventHead{}, err
	}
	return eventHead{Revision: ev.Revision, Kind: ev.Kind, TwinID: ev.Twin.ID, Version: ev.Twin.Version}, nil
}

func encodeCommandJSON(c *Command) ([]byte, error) { return json.Marshal(c) }

func decodeCommandJSON(b []byte) (*Command, error) {
	c := new(Command)
	if err := json.Unmarshal(b, c); err != nil {
		return nil, fmt.Errorf("twin: corrupt command: %w", err)
	}
	return c, nil
}

func encodeRuleStateJSON(s *RuleState) ([]byte, error) { return json.Marshal(s) }

func decodeRuleStateJSON(b []byte) (RuleState, error) {
	var s RuleState
	if err := json.Unmarshal(b, &s); err != nil {
		return RuleState{}, fmt.Errorf("twin: corrupt rule state: %w", err)
	}
	return s, nil
}
