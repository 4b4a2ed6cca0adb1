import sys, struct
a=open(sys.argv[1]).read().split('\n')
b=open(sys.argv[2]).read().split('\n')
print(len(a),len(b))
def val(h):
    return struct.unpack('>d', bytes.fromhex(h.zfill(16)))[0]
diff=0
for x,y in zip(a,b):
    if x!=y:
        diff+=1
        la,va=x.split(': ',1); lb,vb=y.split(': ',1)
        if la!=lb: print('LABEL', la, lb); continue
        va=va.split(' '); vb=vb.split(' ')
        if len(va)!=len(vb): print(la,'len',len(va),len(vb)); continue
        worst=0; n=0
        for p,q in zip(va,vb):
            if p!=q:
                n+=1
                P,Q=val(p),val(q)
                worst=max(worst,abs(P-Q)/max(abs(P),abs(Q),1e-300))
        print(f'{la}: {n}/{len(va)} differ, worst rel {worst:.2e}')
print('lines differing', diff, 'of', len(a))
