package main

import "testing"

func TestByteSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		str  string
	}{
		{"512MiB", 512 << 20, "512MiB"},
		{"2GiB", 2 << 30, "2GiB"},
		{"2gib", 2 << 30, "2GiB"},
		{"1.5G", 3 << 29, "1536MiB"},
		{"64KB", 64_000, "64000"},
		{"1GB", 1_000_000_000, "1000000000"},
		{"4096", 4096, "4KiB"},
		{"100 MiB", 100 << 20, "100MiB"},
		{"0", 0, "0"},
	} {
		var b byteSize
		if err := b.Set(tc.in); err != nil {
			t.Errorf("Set(%q) = %v", tc.in, err)
			continue
		}
		if int64(b) != tc.want || b.String() != tc.str {
			t.Errorf("Set(%q) = %d (%s); want %d (%s)", tc.in, int64(b), b.String(), tc.want, tc.str)
		}
	}
	for _, bad := range []string{"", "x", "-1GiB", "1XB", "GiB", "1e30"} {
		var b byteSize
		if err := b.Set(bad); err == nil {
			t.Errorf("Set(%q) = %d; want an error", bad, int64(b))
		}
	}
}

func TestMemorySizes(t *testing.T) {
	for _, tc := range []struct{ cache, limit, wantCache, wantLimit byteSize }{
		{0, 0, 512 << 20, 1536 << 20},
		{2 << 30, 0, 2 << 30, 4<<30 + 512<<20},
		{2 << 30, 3 << 30, 2 << 30, 3 << 30},
		{0, 1 << 30, 512 << 20, 1 << 30},
	} {
		if c, l := memorySizes(tc.cache, tc.limit); c != tc.wantCache || l != tc.wantLimit {
			t.Errorf("memorySizes(%s, %s) = %s, %s; want %s, %s", &tc.cache, &tc.limit, &c, &l, &tc.wantCache, &tc.wantLimit)
		}
	}
}
